"""Table-2 statistics: the stated word rule reproduces the paper's 10.27 on the AudioCaps test CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from stages.export.caption_stats import caption_stats, words

REPO = Path(__file__).resolve().parents[2]


def test_word_rule() -> None:
    assert words("A man's voice, then 2 dogs bark!") == ["a", "man's", "voice", "then", "dogs", "bark"]
    assert words("It's LOUD -- rock'n'roll") == ["it's", "loud", "rock'n", "roll"]
    assert words("") == []


def test_counts_and_vocabulary() -> None:
    s = caption_stats(["A dog barks", "a DOG whines.", ""])
    assert (s.captions, s.words, s.vocabulary) == (3, 6, 4)
    assert s.as_dict() == {"captions": 3, "words_per_caption": 2.0, "vocabulary": 4}
    assert caption_stats([]).words_per_caption == 0.0


def test_audiocaps_test_split_matches_the_paper() -> None:
    with open(REPO / "manifests/audiocaps/test.csv", newline="", encoding="utf-8") as fh:
        captions = [row["caption"] for row in csv.DictReader(fh)]
    s = caption_stats(captions)
    assert s.captions == 4875
    assert round(s.words_per_caption, 2) == 10.27  # paper, Table 2
    assert s.vocabulary == 1674  # the paper's 1,319 uses a tokenizer it does not name
