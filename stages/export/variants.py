"""Training variants of AudioVisualCaps (paper, Sec. 4.1) built from the two per-modality captions.

The train split has no merged captions: each clip has an audio caption (AudioCaps) and a visual
caption (BLIP-2). The paper trains on four ways of using them, all pure functions here:

- ``random``: one of the two captions, chosen per clip and per caption by a seeded RNG keyed by
  ``(seed, clip_id, index)``, so the choice does not depend on row order, shards or other clips;
- ``concat``: both as two sentences (each capitalised and ending with a period);
- ``and``: both joined into one sentence with "and": the first caption's final period is dropped
  and the second caption's first letter is lowercased unless its first word is an acronym, the
  pronoun "I", has capitals after its first letter, or is a known proper noun;
- ``per_modality``: both kept as separate references.

Order is always audio first, visual second. An empty caption (e.g. a visual caption the captioner
left empty) is skipped: every variant then falls back to the other caption alone.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

from pipeline.text import squash_spaces

VARIANTS: tuple[str, ...] = ("random", "concat", "and", "per_modality")
_FIRST_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_TERMINAL = ".!?"


class UnknownVariant(ValueError):
    """A variant name that does not exist; the message lists the valid ones."""


def check_variants(names: Iterable[str]) -> list[str]:
    """Return ``names`` as a list, or raise naming the unknown ones and listing the valid ones."""
    names = list(names)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise UnknownVariant(
            f"unknown variant(s) {', '.join(map(repr, bad))}; valid variants: {', '.join(VARIANTS)}"
        )
    if len(set(names)) != len(names):
        raise UnknownVariant(f"variant listed twice in {names}")
    return names


def keeps_capital(word: str, proper_nouns: frozenset[str] = frozenset()) -> bool:
    """Whether a sentence-initial word keeps its capital letter when moved mid-sentence.

    Acronyms (``TV``, ``DJ``), the pronoun ``I`` (and ``I'm``...), words with capitals after the
    first letter (``McDonald``) and the given proper nouns (compared case-sensitively, e.g. from
    :func:`proper_nouns_from`) keep it; a single capital ``A`` is the article and does not.
    """
    core = word.split("'")[0].split("-")[0]
    if core == "I":
        return True
    letters = [c for c in core if c.isalpha()]
    if len(letters) >= 2 and all(c.isupper() for c in letters):
        return True
    if any(c.isupper() for c in core[1:]):
        return True
    return core in proper_nouns


def proper_nouns_from(captions: Iterable[str]) -> frozenset[str]:
    """Words that occur capitalised in the middle of a caption and never in lowercase.

    A data-driven proper-noun list (``Paris``, ``Spanish``...) for :func:`join_and`; words seen
    only at the start of a caption tell nothing and are ignored.
    """
    capital_mid: set[str] = set()
    lower: set[str] = set()
    for text in captions:
        words = squash_spaces(text).split(" ")
        for i, w in enumerate(words):
            m = _FIRST_WORD.match(w)
            if not m:
                continue
            token = m.group(0).split("'")[0]
            if token[:1].islower():
                lower.add(token.lower())
            elif i > 0 and token[:1].isupper():
                capital_mid.add(token)
    return frozenset(w for w in capital_mid if w.lower() not in lower)


def _lower_first(text: str, proper_nouns: frozenset[str]) -> str:
    m = _FIRST_WORD.match(text)
    if not m or keeps_capital(m.group(0), proper_nouns):
        return text
    return text[0].lower() + text[1:]


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text[-1] in _TERMINAL else text + "."


def join_and(first: str, second: str, proper_nouns: frozenset[str] = frozenset()) -> str:
    """``"A dog barks." + "A man walks"`` -> ``"A dog barks and a man walks"``."""
    a, b = squash_spaces(first), squash_spaces(second)
    if not a or not b:
        return a or b
    a = a.rstrip(".").rstrip()
    return f"{a} and {_lower_first(b, proper_nouns)}"


def concat(first: str, second: str) -> str:
    """``"a dog barks" + "a man walks"`` -> ``"A dog barks. A man walks."``."""
    parts = [squash_spaces(first), squash_spaces(second)]
    return " ".join(_sentence(p) for p in parts if p)


def pick_random(first: str, second: str, seed: int, clip_id: str, index: int = 0) -> tuple[str, str]:
    """One of the two captions; returns ``(caption, "audio" | "visual")``.

    The RNG is keyed by ``(seed, clip_id, index)`` (a string seed hashes with SHA-512 inside
    :class:`random.Random`, stable across runs and platforms). An empty caption is never chosen.
    """
    a, b = squash_spaces(first), squash_spaces(second)
    if not b:
        return a, "audio"
    if not a:
        return b, "visual"
    choose_audio = random.Random(f"{seed}:{clip_id}:{index}").random() < 0.5
    return (a, "audio") if choose_audio else (b, "visual")


def build_variant(
    variant: str,
    audio_captions: list[str],
    visual_caption: str,
    *,
    clip_id: str,
    seed: int,
    proper_nouns: frozenset[str] = frozenset(),
) -> tuple[list[str], list[str]]:
    """The references of one clip under ``variant``, and where each came from.

    For ``random``, ``concat`` and ``and`` there is one reference per audio caption (1 on train,
    5 on val); ``per_modality`` gives the audio captions followed by the visual caption. Sources
    are ``audio``, ``visual`` or ``audio+visual``.
    """
    check_variants([variant])
    audios = [squash_spaces(a) for a in audio_captions if squash_spaces(a)]
    visual = squash_spaces(visual_caption)
    if variant == "per_modality":
        refs = [*audios, visual] if visual else list(audios)
        return refs, ["audio"] * len(audios) + (["visual"] if visual else [])
    refs = []
    sources: list[str] = []
    for i, audio in enumerate(audios):
        if variant == "random":
            text, source = pick_random(audio, visual, seed, clip_id, i)
        elif variant == "concat":
            text, source = concat(audio, visual), "audio+visual" if visual else "audio"
        else:
            text, source = join_and(audio, visual, proper_nouns), "audio+visual" if visual else "audio"
        refs.append(text)
        sources.append(source)
    return refs, sources
