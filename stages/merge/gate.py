"""The quality gate of stage 4 (version 2): is an LLM's merged caption fit to keep?

Pure functions, no I/O, no model: :func:`check_answer` takes the raw text an LLM returned, the
captions it merged and why the LLM stopped, and returns a :class:`Verdict` with the caption it
recovered, a short machine-readable reason when it fails, and the figures behind the decision
(stored on the ledger row as ``merge_checks`` for audit).

Checks, in order (the first failing one is the reason):

- ``truncated``: the LLM stopped at its token budget (``finish_reason == "length"``): the answer is
  cut off even when what is left parses.
- ``invalid_json``: the answer looks like JSON (starts with ``{``) but does not parse to an object
  with a string ``caption``. A plain sentence is a *recoverable* answer and is taken as is;
  ``unparsable``: several lines of plain text that are not one caption.
- ``empty``: nothing left after stripping quotes and whitespace.
- ``refusal``: "I'm sorry", "I cannot", "as an AI"...
- ``chatter``: a chat preamble ("Sure! Here is the merged caption:") or a trailing remark ("Let me
  know if...") is stripped when what is left is one clean caption (one line, one sentence, no
  colon); otherwise the answer is refused.
- ``meta_text``: talks about the inputs instead of the scene ("the image shows", "caption").
- ``too_long`` / ``too_short``: outside the word budget.
- ``missing_audio`` / ``missing_visual``: too few of the content words of the audio (visual)
  caption survive in the answer (recall of content words; with several audio captions, the best
  one counts).
- ``invented``: too large a share of the answer's content words is in neither caption, or a
  colour is (a colour is never a paraphrase).

Words are compared after Snowball's English stemmer (Porter2: "horses"/"horse", "engines"/"engine",
"barking"/"barked"/"barks", "loudly"/"loud" meet), irregular plurals mapped first, stop words
dropped; stems of 5+ letters that begin one another are one word family (thunder/thunderstorm,
cloud/cloudy). Allowed without a source: function words, a few connective scene words a fluent
merge needs ("background", "nearby", "sound"...), one word of each small group of free variants
(speak/talk, person/someone/people...) when the captions use another, and a size word when the
captions name a size (big/large/huge...).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from pipeline.text import squash_spaces

GATE_VERSION = 2
# Every reason the gate gives, in the order it checks them ("ok" when none applies).
REASONS = (
    "truncated",
    "invalid_json",
    "unparsable",
    "empty",
    "refusal",
    "chatter",
    "meta_text",
    "too_long",
    "too_short",
    "missing_audio",
    "missing_visual",
    "invented",
    "ok",
)

_STOP = """a an the and or but nor of in on at to for with without by from as into onto upon over
    under near across around along behind beside besides between beyond through throughout toward
    towards against among amid about above below beneath off out up down within while then than
    that this these those there here is are was were be being been am it its it's itself his her
    hers him their theirs they them he she we you i me my our your yours some any each every other
    another one very too also just during before after again so such can could may might will
    would shall should must do does did doing done has have had having not no only own same both
    which who whom whose what when where why how all more most less few several many much lot lots
    if else yet still even though although because since until till once"""
STOP_WORDS = frozenset(_STOP.split())

# Words a fluent merge uses to tie the sound to the scene without adding anything to it.
_CONNECTIVE = """background foreground distance nearby close sound sounds noise noises heard hear
    hears audible visible seen appear appears scene setting area together alongside meanwhile
    simultaneously accompanied followed present someone somebody something"""
CONNECTIVE = frozenset(_CONNECTIVE.split())
# Free variants: a merge may write any word of a group for another of the same group.
VARIANTS = (
    "speak talk say chat converse speech",
    "person someone somebody people individual",
    "man male guy gentleman",
    "woman female lady",
    "child kid",
    "car automobile",
    "gray grey",
)
_SIZES = "big large huge giant enormous massive small little tiny tall"
SIZES = frozenset(_SIZES.split())
# A colour is never a paraphrase: one in neither caption fails the gate however short its share.
_COLOURS = "black white red green blue yellow orange purple pink brown gray grey silver golden gold beige"
COLOURS = frozenset(_COLOURS.split())
# Stems this long that begin one another are one word family (thunder / thunderstorm, cloud /
# cloudy, motor / motorboat), which Snowball leaves apart.
MIN_PREFIX = 5
# Irregular plurals Snowball does not map (the ones in AudioCaps captions, and their kin).
IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "feet": "foot",
    "geese": "goose",
    "mice": "mouse",
    "teeth": "tooth",
    "oxen": "ox",
    "people": "person",
}

META_PATTERNS = (
    r"\bthe (?:image|picture|photo|video|frame|scene) (?:shows|depicts|features|contains)\b",
    r"\b(?:in|from) the (?:image|picture|photo|video|frame)\b",
    r"\bcaptions?\b",
    r"\b(?:audio|visual) (?:description|input)s?\b",
)
REFUSAL_PATTERNS = (
    r"\bi(?:'m| am)? sorry\b",
    r"\bi (?:can ?not|can't|won't)\b",
    r"\bi(?: am|'m) (?:unable|not able)\b",
    r"\bas an ai\b",
    r"\blanguage model\b",
    r"\bi do not have\b",
)
# A chat opener sentence ("Sure!", "Certainly.", "Of course, happy to help!") or a lead-in that
# ends in a colon and names what follows ("Here is the merged result:", "Merged caption:").
_OPENER = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|absolutely|alright|all right|great|no problem|happy to help)"
    r"\b(?:\s*[,:]|[^.!?:\n]{0,40}[.!])\s*",
    re.IGNORECASE,
)
_LEAD_IN = re.compile(
    r"^\s*[^:\n]{0,60}\b(?:here|merged|combined|final|caption|result|answer|sentence|description|output)"
    r"\b[^:\n]{0,40}:\s*",
    re.IGNORECASE,
)
# A trailing remark: from such a sentence (or parenthesis) to the end.
_TRAILER = re.compile(
    r"(?:^|(?<=[.!?])\s+|\n+|\s+(?=\())\(?\s*(?:note:|(?:let me know|i hope|hope this|feel free|"
    r"this caption|this merged|this combines|this keeps|this sentence|this version|the merged|"
    r"would you like|do you want|if you (?:want|need|would|prefer)|is there anything)\b).*$",
    re.IGNORECASE | re.DOTALL,
)
_META = re.compile("|".join(META_PATTERNS), re.IGNORECASE)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)
_INNER_SENTENCE_END = re.compile(r"[.!?]\s+\S")


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gate (from the ``merge`` config section)."""

    max_words: int = 40
    min_words: int = 3
    min_audio_overlap: float = 0.4
    min_visual_overlap: float = 0.4
    max_invented: float = 0.25


@dataclass
class Verdict:
    ok: bool
    reason: str
    caption: str | None
    parsed: str  # "json", "plain" or "none"
    words: int = 0
    audio_overlap: float = 0.0
    visual_overlap: float = 0.0
    invented_share: float = 0.0
    invented: list[str] = field(default_factory=list)  # the answer's words found in no caption
    stripped: list[str] = field(default_factory=list)  # preamble / trailing remark removed
    finish_reason: str | None = None
    gate_version: int = GATE_VERSION

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def _stemmer() -> Any:
    # Snowball (Porter2) from `snowballstemmer`: pure Python, no data files; imported lazily so
    # the vLLM venv, which runs the backends only, never needs it.
    import snowballstemmer

    return snowballstemmer.stemmer("english")


@cache
def stem(word: str) -> str:
    """The Snowball stem of a lower-case word, irregular plurals mapped to their singular first."""
    return _stemmer().stemWord(IRREGULAR.get(word, word))


@cache
def _variant_groups() -> dict[str, frozenset[str]]:
    groups: dict[str, frozenset[str]] = {}
    for line in VARIANTS:
        stems = frozenset(stem(w) for w in line.split())
        for s in stems:
            groups[s] = stems
    return groups


@cache
def _allowed() -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The stems of the connective words, of the size words and of the colours."""
    connective, sizes, colours = (frozenset(stem(w) for w in ws) for ws in (CONNECTIVE, SIZES, COLOURS))
    return connective, sizes, colours


def _found(s: str, pool: set[str] | frozenset[str]) -> bool:
    """Whether stem ``s`` is in ``pool``: itself, a free variant, or one of its word family."""
    if s in pool or _variant_groups().get(s, frozenset()) & pool:
        return True
    return len(s) >= MIN_PREFIX and any(
        len(p) >= MIN_PREFIX and (p.startswith(s) or s.startswith(p)) for p in pool
    )


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS and len(w) > 1]


def content_words(text: str) -> set[str]:
    """The stems of the content words of ``text`` (stop words dropped)."""
    return {stem(w) for w in _words(text)}


def overlap(source: str, answer: str, other: str = "") -> float:
    """The share of the source's content words that the answer keeps (1.0 for an empty source).
    A free variant of a source word counts as kept (speaks / talks).

    Words the source shares with ``other`` (the other caption) are left out when the source has
    words of its own: "a dog" kept for the picture does not prove the barking was kept."""
    src = content_words(source)
    shared = content_words(other)
    own = {s for s in src if not _found(s, shared)}
    src = own or src
    if not src:
        return 1.0
    kept = content_words(answer)
    return sum(1 for s in src if _found(s, kept)) / len(src)


def invented_words(answer: str, sources: list[str]) -> tuple[list[str], float]:
    """The answer's content words found in no source (after stemming, allowances applied), and
    their share of the answer's distinct content words (0.0 for an answer without any)."""
    connective, sizes, _ = _allowed()
    src = set().union(*(content_words(s) for s in sources))
    if src & sizes:  # the captions name a size: any size word may say it
        src |= sizes
    seen: dict[str, str] = {}
    for w in _words(answer):
        seen.setdefault(stem(w), w)
    if not seen:
        return [], 0.0
    invented = [w for s, w in seen.items() if s not in connective and not _found(s, src)]
    return invented, len(invented) / len(seen)


def colours(words: list[str]) -> list[str]:
    """The colours among ``words``."""
    return [w for w in words if stem(w) in _allowed()[2]]


def clean(caption: str) -> str:
    """Control characters to spaces, runs of whitespace to one space, ends trimmed. (Captioning
    drops control characters instead: a model's stray byte is noise there, a separator here.)"""
    return squash_spaces(_CONTROL.sub(" ", caption))


def strip_chatter(text: str) -> tuple[str, list[str], bool]:
    """``text`` without a chat preamble and a trailing remark: (rest, what was removed, clean).

    ``clean`` is False when something was removed and the rest is not one clean caption (one
    line, one sentence, no colon): then the answer is chatter, not a caption with chatter around it.
    """
    rest, removed = text.strip(), []
    for pattern in (_OPENER, _LEAD_IN, _OPENER, _LEAD_IN):  # "Sure! Here is the merged result: ..."
        m = pattern.match(rest)
        if m and m.end() < len(rest):
            removed.append(m.group(0).strip())
            rest = rest[m.end() :].strip()
    m = _TRAILER.search(rest)
    if m and m.start() > 0:
        removed.append(m.group(0).strip())
        rest = rest[: m.start()].strip()
    rest = rest.strip().strip("\"'`“”").strip()
    if not removed:
        return rest, removed, True
    ok = bool(rest) and "\n" not in rest and ":" not in rest and not _INNER_SENTENCE_END.search(rest)
    return rest, removed, ok


def parse_answer(raw: str) -> tuple[str | None, str]:
    """The caption in an LLM answer and how it was found: ("...", "json"|"plain") or (None, "none").

    JSON (possibly in a Markdown code fence) must be an object with a string ``caption``. A plain
    answer that does not start like JSON is recovered as is, minus surrounding quotes; over several
    lines only if chatter lines around one caption line are all that is there besides it.
    """
    text = (raw or "").strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if text.startswith(("{", "[")):
        try:
            # strict=False: a raw control character inside the string (grammar-constrained
            # decoding lets one through) is no reason to throw the answer away; it is cleaned below.
            obj = json.loads(text, strict=False)
        except json.JSONDecodeError:
            return None, "none"
        if isinstance(obj, dict) and isinstance(obj.get("caption"), str):
            return clean(obj["caption"]), "json"
        return None, "none"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        # Several lines: one caption line with chatter lines around it is recoverable (checked by
        # strip_chatter); anything else is the model rambling (reasoning leaked into the answer).
        _, removed, ok = strip_chatter("\n".join(lines))
        if not removed or not ok:
            return None, "none"
    return text.strip().strip("\"'`"), "plain"


def _unparsed_reason(raw: str) -> str:
    text = (raw or "").strip()
    if not text:
        return "empty"
    return "invalid_json" if text.lstrip("`").startswith(("{", "[", "json")) else "unparsable"


def check_answer(
    raw: str,
    audio: str | list[str],
    visual: str,
    settings: GateSettings,
    finish_reason: str | None = None,
) -> Verdict:
    """Apply every check to one answer; see the module docstring for the reasons. ``audio`` is
    the audio caption merged, or all of them (all-in-one mode: the best covered one counts)."""
    audios = [audio] if isinstance(audio, str) else list(audio)
    text, how = parse_answer(raw)
    v = Verdict(ok=False, reason="", caption=None, parsed=how, finish_reason=finish_reason)
    if text is None:
        v.reason = "truncated" if finish_reason == "length" else _unparsed_reason(raw)
        return v
    caption, v.stripped, clean_rest = strip_chatter(text)
    caption = clean(caption)
    v.caption = caption
    v.words = len(caption.split())
    v.audio_overlap = round(max(overlap(a, caption, visual) for a in audios), 3)
    v.visual_overlap = round(overlap(visual, caption), 3)
    invented, share = invented_words(caption, [*audios, visual])
    v.invented, v.invented_share = invented, round(share, 3)
    if finish_reason == "length":
        v.reason = "truncated"
    elif not caption:
        v.reason = "empty"
    elif _REFUSAL.search(text):
        v.reason = "refusal"
    elif not clean_rest:
        v.reason = "chatter"
    elif _META.search(caption):
        v.reason = "meta_text"
    elif v.words > settings.max_words:
        v.reason = "too_long"
    elif v.words < settings.min_words:
        v.reason = "too_short"
    elif v.audio_overlap < settings.min_audio_overlap:
        v.reason = "missing_audio"
    elif v.visual_overlap < settings.min_visual_overlap:
        v.reason = "missing_visual"
    elif v.invented_share > settings.max_invented or colours(v.invented):
        v.reason = "invented"
    else:
        v.ok, v.reason = True, "ok"
    return v
