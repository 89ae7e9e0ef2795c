"""What an annotator sees: the labeling config, the instructions, and the task payloads.

A task shows the clip's middle keyframe, plays its audio, shows the audio caption(s) and the visual
caption, the merge's CLAP/CLIP scores with their run percentiles and its risk (:mod:`stages.review.risk`),
and holds the LLM merge prefilled (as a prediction) in an editable text area, one line per merged
caption. The verdict (accept / edited / rejected) is required; a comment is optional. The
instructions link to the annotator guide (:mod:`stages.review.guide`).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from stages.keyframes import middle_index

FINAL = "final"  # the TextArea holding the (edited) merged captions
VERDICT = "verdict"
COMMENT = "comment"

LABEL_CONFIG = """<View>
  <Header value="Clip $clip_id" size="4"/>
  <View style="display: flex; gap: 24px; align-items: flex-start">
    <View style="flex: 1; max-width: 480px">
      <Header value="Keyframe (middle of the clip)" size="5"/>
      <Image name="keyframe" value="$image" maxWidth="480px"/>
    </View>
    <View style="flex: 1">
      <Header value="Audio (10 s)" size="5"/>
      <Audio name="audio" value="$audio"/>
      <Header value="Audio caption(s) (AudioCaps, human)" size="5"/>
      <Text name="audio_captions" value="$audio_captions_text"/>
      <Header value="Visual caption (BLIP-2, keyframe)" size="5"/>
      <Text name="visual_caption" value="$visual_caption"/>
      <Header value="Quality scores (CLAP: audio, CLIP: keyframe; percentile over this run)" size="6"/>
      <Text name="scores" value="$scores_text"/>
    </View>
  </View>
  <Header value="Merged caption(s): edit if needed, one per line" size="5"/>
  <TextArea name="final" toName="audio" editable="true" rows="2"
            placeholder="Merged audio-visual caption"/>
  <Header value="Verdict" size="5"/>
  <Choices name="verdict" toName="audio" choice="single" required="true" showInline="true">
    <Choice value="accept" hint="The merge is right as it was proposed"/>
    <Choice value="edited" hint="I corrected the merge in the text area"/>
    <Choice value="rejected" hint="No good merged caption is possible (wrong media, unusable)"/>
  </Choices>
  <TextArea name="comment" toName="audio" rows="1" maxSubmissions="1"
            placeholder="Optional comment"/>
</View>
"""


def instructions(guide_url: str) -> str:
    """The project's instructions (HTML), with the link to the annotator guide."""
    link = html.escape(guide_url, quote=True)
    return f"""<h3>Review the merged audio-visual captions</h3>
<p><b><a href="{link}" target="_blank" rel="noopener">Read the annotator guide</a></b> first: what
accept, edited and rejected mean, with three worked examples (Ctrl-click or middle-click to keep
this page open beside it).</p>
<p>Each task is one 10-second clip. Look at the keyframe, <b>listen to the audio</b>, read the
human audio caption(s) and the machine visual caption, then check the merged caption(s) proposed by
the language model in the text area, one line per audio caption.</p>
<p>A good merged caption is <b>one fluent sentence</b> that keeps every sound event of the audio
caption, adds only what the picture really shows (the visual caption can be wrong: trust your eyes
and ears), and invents nothing that neither the audio nor the picture supports.</p>
<p>Examples of good merged captions:</p>
<ul>
<li>Audio: <i>"A dog barks while birds chirp"</i>; visual: <i>"a brown dog standing on a lawn"</i>
&rarr; <b>"A brown dog barks on a sunny lawn while birds chirp nearby."</b></li>
<li>Audio: <i>"An engine revs and tires squeal"</i>; visual: <i>"a red race car on a track"</i>
&rarr; <b>"A red race car's engine revs and its tires squeal as it speeds around a track."</b></li>
</ul>
<p>Then choose a verdict: <b>accept</b> when the merge is right as proposed, <b>edited</b> when you
corrected it in the text area (keep <b>one line per audio caption</b>: an edit with lines missing
or added is set aside), <b>rejected</b> when no good caption is
possible (for example the picture does not match the sound, or the media is broken). Add a comment
if something is worth telling.</p>
<p><b>How to correct a caption:</b> click the pencil on its line, type, press Enter and then click
outside the line (the change is kept when the line loses focus); or delete the line (trash button),
type the corrected caption in the box and press Shift+Enter (the box adds the line at the end: for
any other line than the last, correct it in place to keep the order). Keep one caption per line.</p>
"""


def local_files_url(path: Path, document_root: Path) -> str:
    """The URL under which Label Studio serves ``path`` (local-files storage)."""
    rel = os.path.relpath(path.resolve(), document_root.resolve())
    if rel.startswith(".."):
        raise ValueError(f"{path} is not under the Label Studio document root {document_root}")
    return "/data/local-files/?d=" + quote(Path(rel).as_posix(), safe="/")


def text_result(texts: list[str], from_name: str = FINAL) -> dict[str, Any]:
    return {"from_name": from_name, "to_name": "audio", "type": "textarea", "value": {"text": list(texts)}}


def verdict_result(verdict: str) -> dict[str, Any]:
    return {"from_name": VERDICT, "to_name": "audio", "type": "choices", "value": {"choices": [verdict]}}


def build_task(
    clip_id: str,
    data: dict[str, Any],
    workdir: Path,
    document_root: Path,
    model_version: str,
    display: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One task (with the merge as a prediction) for the clip; ``data`` follows the column contract;
    ``display``: the score keys of :func:`stages.review.risk.RunScores.task_fields` (none: unscored).

    Raises :class:`FileNotFoundError` naming the missing media file, :class:`KeyError` naming the
    missing column.
    """
    frames = list(data["frame_paths"])
    middle = middle_index(len(frames), data.get("middle_frame"))
    if middle is None:
        raise KeyError(f"frame_paths (got no frame, middle_frame={data.get('middle_frame')})")
    image = workdir / frames[middle]
    audio = workdir / data["audio_path"]
    for path in (image, audio):
        if not path.is_file():
            raise FileNotFoundError(f"media file missing: {path}")
    audio_caps = [str(c) for c in data["audio_captions"]]
    merged = [str(c) for c in data["merged_captions"]]
    task_data = {
        "clip_id": clip_id,
        "image": local_files_url(image, document_root),
        "audio": local_files_url(audio, document_root),
        "audio_captions": audio_caps,
        "audio_captions_text": "\n".join(
            f"{i}. {c}" if len(audio_caps) > 1 else c for i, c in enumerate(audio_caps, 1)
        ),
        "visual_caption": str(data.get("visual_caption") or ""),
        "merged_captions": merged,
        "merge_model": str(data.get("merge_model") or ""),
    }
    if display is None:
        from stages.review.risk import scores_text

        display = {"risk": None, "scores": {}, "scores_text": scores_text({}, None, 0, 0, 0)}
    task_data.update(display)
    prediction = {"model_version": model_version, "score": 1.0, "result": [text_result(merged)]}
    return {"data": task_data, "predictions": [prediction]}


def parse_result(result: list[dict[str, Any]]) -> tuple[str | None, list[str], str]:
    """(verdict or None, texts of the final TextArea, comment) from an annotation's result."""
    verdict: str | None = None
    texts: list[str] = []
    comments: list[str] = []
    for region in result or []:
        name, value = region.get("from_name"), region.get("value") or {}
        if name == VERDICT:
            choices = value.get("choices") or []
            verdict = str(choices[0]) if choices else None
        elif name == FINAL:
            texts.extend(str(t) for t in value.get("text") or [])
        elif name == COMMENT:
            comments.extend(str(t) for t in value.get("text") or [])
    # An annotator may type several captions into one line box; keep one caption per line.
    lines = [line.strip() for t in texts for line in t.splitlines()]
    return verdict, [t for t in lines if t], " ".join(c.strip() for c in comments if c.strip())
