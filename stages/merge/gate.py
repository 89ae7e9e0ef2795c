"""The quality gate of stage 4: is an LLM's merged caption fit to keep?

Pure functions, no I/O, no model: :func:`check_answer` takes the raw text an LLM returned and the
two captions it merged, and returns a :class:`Verdict` with the caption it recovered, a short
machine-readable reason when it fails, and the figures behind the decision (stored on the ledger
row as ``merge_checks`` for audit).

Checks, in order (the first failing one is the reason):

- ``invalid_json``: the answer looks like JSON (starts with ``{``) but does not parse to an object
  with a string ``caption``. A plain sentence is a *recoverable* answer and is taken as is.
- ``empty``: nothing left after stripping quotes and whitespace.
- ``refusal``: "I'm sorry", "I cannot", "as an AI"...
- ``meta_text``: talks about the inputs instead of the scene ("the image shows", "caption").
- ``too_long`` / ``too_short``: outside the word budget.
- ``missing_audio`` / ``missing_visual``: too few of the content words of the audio (visual)
  caption survive in the answer. Coverage is recall of content words (stop words dropped, a light
  suffix stemmer so "barks"/"barking"/"bark" match), compared to a configurable threshold.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.text import squash_spaces

_STOP = """a an the and or but of in on at to for with by from as into onto over under near while
    then than that this these those there here is are was were be being been it its it's his her
    their they them he she we you i my our your some any each other another one two very too also
    just while during before after through up down out off again so such can could may might
    will would shall should do does did doing has have had having not no nor only own same both
    which who whom whose what when where why how all more most few several many much"""
STOP_WORDS = frozenset(_STOP.split())

META_PATTERNS = (
    r"\bthe (?:image|picture|photo|video|frame|scene) (?:shows|depicts|features|contains)\b",
    r"\b(?:in|from) the (?:image|picture|photo|video|frame)\b",
    r"\bcaptions?\b",
    r"\b(?:audio|visual) (?:description|input)s?\b",
)
REFUSAL_PATTERNS = (
    r"\bi(?:'m| am)? sorry\b",
    r"\bi (?:can ?not|can't|won't|am unable|'m unable)\b",
    r"\bas an ai\b",
    r"\blanguage model\b",
    r"\bi do not have\b",
)
_META = re.compile("|".join(META_PATTERNS), re.IGNORECASE)
_REFUSAL = re.compile("|".join(REFUSAL_PATTERNS), re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gate (from the ``merge`` config section)."""

    max_words: int = 40
    min_words: int = 3
    min_audio_overlap: float = 0.3
    min_visual_overlap: float = 0.3


@dataclass
class Verdict:
    ok: bool
    reason: str
    caption: str | None
    parsed: str  # "json", "plain" or "none"
    words: int = 0
    audio_overlap: float = 0.0
    visual_overlap: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stem(word: str) -> str:
    """A deliberately tiny suffix stemmer: enough for "barks"/"barking"/"barked" to meet."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if len(word) >= 4 and word[-1] == word[-2]:  # running -> runn -> run
        word = word[:-1]
    return word


def content_words(text: str) -> set[str]:
    return {stem(w) for w in _WORD.findall(text.lower()) if w not in STOP_WORDS and len(w) > 1}


def overlap(source: str, answer: str) -> float:
    """The share of the source's content words that the answer keeps (1.0 for an empty source)."""
    src = content_words(source)
    if not src:
        return 1.0
    return len(src & content_words(answer)) / len(src)


def clean(caption: str) -> str:
    """Control characters to spaces, runs of whitespace to one space, ends trimmed. (Captioning
    drops control characters instead: a model's stray byte is noise there, a separator here.)"""
    return squash_spaces(_CONTROL.sub(" ", caption))


def parse_answer(raw: str) -> tuple[str | None, str]:
    """The caption in an LLM answer and how it was found: ("...", "json"|"plain") or (None, "none").

    JSON (possibly in a Markdown code fence) must be an object with a string ``caption``. A plain
    answer that does not start like JSON is recovered as is, minus surrounding quotes.
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
    if "\n" in text.strip():
        # Several lines: take the first non-empty one only if the rest is empty; otherwise the
        # model rambled (reasoning leaked into the answer) and nothing is recoverable safely.
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) != 1:
            return None, "none"
        text = lines[0]
    return clean(text.strip().strip("\"'`")), "plain"


def check_answer(raw: str, audio: str, visual: str, settings: GateSettings) -> Verdict:
    """Apply every check to one answer; see the module docstring for the reasons."""
    caption, how = parse_answer(raw)
    if caption is None:
        reason = (
            "invalid_json"
            if (raw or "").strip().lstrip("`").startswith(("{", "[", "json"))
            else ("empty" if not (raw or "").strip() else "unparsable")
        )
        return Verdict(False, reason, None, how)
    n_words = len(caption.split())
    v = Verdict(
        ok=False,
        reason="",
        caption=caption,
        parsed=how,
        words=n_words,
        audio_overlap=round(overlap(audio, caption), 3),
        visual_overlap=round(overlap(visual, caption), 3),
    )
    if not caption:
        v.reason = "empty"
    elif _REFUSAL.search(caption):
        v.reason = "refusal"
    elif _META.search(caption):
        v.reason = "meta_text"
    elif n_words > settings.max_words:
        v.reason = "too_long"
    elif n_words < settings.min_words:
        v.reason = "too_short"
    elif v.audio_overlap < settings.min_audio_overlap:
        v.reason = "missing_audio"
    elif v.visual_overlap < settings.min_visual_overlap:
        v.reason = "missing_visual"
    else:
        v.ok, v.reason = True, "ok"
    return v
