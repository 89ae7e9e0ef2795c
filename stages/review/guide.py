"""The annotator guide: one static HTML page linked from the project's instructions.

It says what *accept*, *edited* and *rejected* mean and works three examples through. The audio
captions of the examples are the real AudioCaps test captions of the named clips
(``manifests/audiocaps/test.csv``; a test checks them there); their keyframes, visual captions and
merges are written for the guide, since the point is the decision, not the model's output.

Stage 5 writes the page into the run's media folder (``media/guide/annotator-guide.html``), which
Label Studio already serves to the project's members through the run's local-files storage, so the
link works on any server that shows the clips' media; ``review.guide_url`` points elsewhere (a wiki).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

GUIDE_PATH = "guide/annotator-guide.html"  # under the run's media folder


@dataclass(frozen=True)
class Example:
    verdict: str
    clip_id: str
    keyframe: str  # what the keyframe shows (described for the guide)
    visual_caption: str
    audio_captions: tuple[str, ...]  # the clip's AudioCaps test captions, verbatim
    proposed: tuple[str, ...]  # the merge as proposed, one line per audio caption
    final: tuple[str, ...]  # what the annotator submits (empty when rejected)
    why: str


EXAMPLES: tuple[Example, ...] = (
    Example(
        verdict="accept",
        clip_id="-NsC63dA01g_10000_20000",
        keyframe="a woman on a sofa with a grey cat on her lap",
        visual_caption="a woman sitting on a couch with a cat",
        audio_captions=(
            "A cat meows and a woman speaks",
            "A woman speaks and a cat meows",
            "An adult female speaks as a cat meows three times, and an electronic device plays in the "
            "background",
            "A woman talking as a cat meows",
            "Woman speaking to meowing cat",
        ),
        proposed=(
            "A cat meows and a woman sitting on a couch speaks",
            "A woman on a couch speaks and the cat on her lap meows",
            "An adult female on a couch speaks as a cat meows three times, and an electronic device "
            "plays in the background",
            "A woman sitting on a couch talking as a cat meows",
            "A woman on a couch speaking to her meowing cat",
        ),
        final=(),
        why="Every line keeps all the sounds of its audio caption (the three meows, the electronic "
        "device) and adds only what the picture shows (the couch, the cat on her lap). Nothing to "
        "fix: <b>accept</b>, and leave the text as it is.",
    ),
    Example(
        verdict="edited",
        clip_id="qZEIs6tS5vk_0_10000",
        keyframe="a red car spinning its wheels in a parking lot, people watching behind a fence",
        visual_caption="a red sports car on a race track",
        audio_captions=(
            "An engine revving and then tires squealing",
            "A crowd of people talking followed by a vehicle engine revving then tires skidding",
            "A vehicle engine revving followed by tires skidding as a group of people talk in the background",
            "An engine revving and then tires screeching",
            "A truck engine revving followed by tires skidding as a crowd of people talk in the background",
        ),
        proposed=(
            "A red sports car's engine revs on a race track and then its tires squeal",
            "A red sports car's engine revs on a race track, then its tires skid",
            "A red sports car's engine revs on a race track followed by tires skidding as a group of "
            "people talk in the background",
            "A red sports car's engine revs on a race track and then its tires screech",
            "A truck engine revs followed by tires skidding on a race track as a crowd of people talk "
            "in the background",
        ),
        final=(
            "A red car's engine revs in a parking lot and then its tires squeal",
            "A crowd of people talk, then a red car's engine revs in a parking lot and its tires skid",
            "A red car's engine revs in a parking lot followed by tires skidding as a group of people "
            "talk in the background",
            "A red car's engine revs in a parking lot and then its tires screech",
            "A truck engine revs followed by tires skidding in a parking lot as a crowd of people "
            "talk in the background",
        ),
        why="The visual caption is wrong (the picture shows a parking lot, not a race track) and the "
        "merge copied it; line 2 also dropped the crowd that its audio caption hears. Correct each "
        "line in place and keep <b>five lines for five audio captions</b>, in the same order; keep "
        'the audio caption\'s own words for the sounds (line 5 still says "truck engine": the '
        "picture cannot overrule what was heard). Then choose <b>edited</b>.",
    ),
    Example(
        verdict="rejected",
        clip_id="BlbGXalLNVU_70000_80000",
        keyframe="a black title card with white text; the audio is surf and a man talking",
        visual_caption="a black background with white text",
        audio_captions=(
            "A man talking as water splashes",
            "Waves crashing onto shore followed by a man talking",
            "Surf comes ashore as a man speaks",
            "Water splashes and wind blows as men speak",
            "Water moving with male voices soft in the background",
        ),
        proposed=(
            "A man talks as water splashes in front of white text on a black background",
            "Waves crash onto shore followed by a man talking over a black title card",
            "Surf comes ashore as a man speaks over white text on a black screen",
            "Water splashes and wind blows as men speak over a black title card",
            "Water moves with soft male voices over white text on a black background",
        ),
        final=(),
        why="The picture shows none of what is heard (a title card, not the beach), so no caption "
        "can say what is seen and heard together; a broken or silent clip, or a picture of a "
        "different scene, is the same case. Do not rewrite the lines: choose <b>rejected</b> and "
        "say why in the comment. Rejected clips are left out of the test references.",
    ),
)


def _lines(items: tuple[str, ...]) -> str:
    return "<ol>" + "".join(f"<li>{html.escape(x)}</li>" for x in items) + "</ol>"


def _example(n: int, ex: Example) -> str:
    answer = (
        f"<p><b>Submitted text</b> (edited):</p>{_lines(ex.final)}"
        if ex.final
        else "<p><b>Submitted text</b>: unchanged.</p>"
    )
    return f"""<section class="example">
<h3>Example {n}: {html.escape(ex.verdict)}</h3>
<p>Clip <code>{html.escape(ex.clip_id)}</code>. Keyframe: {html.escape(ex.keyframe)}.
Visual caption (machine): <i>"{html.escape(ex.visual_caption)}"</i>.</p>
<p><b>Audio captions</b> (AudioCaps, human):</p>{_lines(ex.audio_captions)}
<p><b>Proposed merge</b> (one line per audio caption):</p>{_lines(ex.proposed)}
{answer}
<p><b>Verdict: {html.escape(ex.verdict)}.</b> {ex.why}</p>
</section>"""


def guide_html() -> str:
    """The guide page (self-contained HTML, no script, no external resource)."""
    examples = "\n".join(_example(i, ex) for i, ex in enumerate(EXAMPLES, 1))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>AudioVisualCaps review: annotator guide</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.45}}
section.example{{border-top:1px solid #ccc;margin-top:1.5em}}code{{background:#eee}}</style>
</head><body>
<h1 id="guide">AudioVisualCaps review: annotator guide</h1>
<p>Each task is one 10-second clip: its keyframe, its audio, the human <b>audio captions</b>
(AudioCaps: they describe only the sound), a machine <b>visual caption</b> of the keyframe, and a
<b>merged caption</b> for each audio caption, proposed by a language model. A good merged caption
is one fluent sentence that keeps <b>every sound</b> of its audio caption, adds only what the
<b>picture really shows</b> (the visual caption can be wrong: trust your eyes and ears), and
invents nothing.</p>
<h2>The three verdicts</h2>
<ul>
<li><b>accept</b>: every merged line is right as proposed. Change nothing in the text.</li>
<li><b>edited</b>: you corrected one or more lines. Keep exactly <b>one line per audio
caption</b>, in the same order: do not delete, join or add lines. An edit with a different
number of lines cannot be matched to its audio captions; it is set aside and reported.</li>
<li><b>rejected</b>: no good audio-visual caption is possible for this clip (the picture does not
show what is heard, the picture or the audio is broken or silent). Say why in the comment.</li>
</ul>
<p>A task may be shown to several annotators; decide on your own. The majority decides: a clip is
kept only when more annotators kept it (accept or edited) than rejected it, and it is edited when
at least as many annotators edited it as accepted it. The agreement between annotators is
published with the dataset.</p>
{examples}
</body></html>
"""
