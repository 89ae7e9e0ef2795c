"""Caption statistics as in the paper's Table 2: words per caption and vocabulary size.

The tokenization is stated, not implied: a caption is lowercased and its words are the matches of
``[a-z]+('[a-z]+)?`` (letters with an optional apostrophe suffix: ``man's``, ``it's``); digits and
punctuation are not words. On the AudioCaps test CSV this gives 10.27 words per caption, the
paper's figure. The paper does not name the tokenizer behind its vocabulary figure (1,319), so our
vocabulary (distinct words under the same rule) need not match it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
TOKENIZATION = "lowercase, words = regex [a-z]+('[a-z]+)? (digits and punctuation are not words)"


def words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


@dataclass(frozen=True)
class CaptionStats:
    captions: int
    words: int
    vocabulary: int

    @property
    def words_per_caption(self) -> float:
        return self.words / self.captions if self.captions else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "captions": self.captions,
            "words_per_caption": round(self.words_per_caption, 2),
            "vocabulary": self.vocabulary,
        }


def caption_stats(captions: Iterable[str]) -> CaptionStats:
    n = total = 0
    vocab: set[str] = set()
    for caption in captions:
        w = words(caption)
        n += 1
        total += len(w)
        vocab.update(w)
    return CaptionStats(n, total, len(vocab))
