"""The training variants (paper, Sec. 4.1) on crafted captions."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from stages.config import RunConfig
from stages.export.variants import (
    VARIANTS,
    UnknownVariant,
    build_variant,
    check_variants,
    concat,
    join_and,
    pick_random,
    proper_nouns_from,
)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A dog barks.", "A man walks a dog", "A dog barks and a man walks a dog"),
        ("A dog barks", "a man walks.", "A dog barks and a man walks."),
        ("Wind blows...  ", "  The sky is grey", "Wind blows and the sky is grey"),
        ("Music plays.", "TV screen showing a game", "Music plays and TV screen showing a game"),
        ("Music plays.", "DJ mixing records", "Music plays and DJ mixing records"),
        ("A man speaks.", "I can see a car", "A man speaks and I can see a car"),
        ("A man speaks.", "I'm looking at a car", "A man speaks and I'm looking at a car"),
        ("A man speaks.", "McDonald's sign at night", "A man speaks and McDonald's sign at night"),
        ("A man speaks.", "A car on a road", "A man speaks and a car on a road"),
        ("Birds chirp", "An airplane in the sky", "Birds chirp and an airplane in the sky"),
    ],
)
def test_and_joins_into_one_sentence(first: str, second: str, expected: str) -> None:
    assert join_and(first, second) == expected


def test_and_keeps_proper_nouns_learnt_from_the_corpus() -> None:
    corpus = [
        "A man speaks Spanish on the radio",
        "Traffic noise in Paris",
        "A dog barks",
        "The wind blows",  # "The" is only seen at a caption start: no evidence, lowercased
        "Music and Dogs",
        "dogs bark",  # "dogs" is seen in lowercase: not a proper noun
    ]
    nouns = proper_nouns_from(corpus)
    assert nouns == frozenset({"Spanish", "Paris"})
    assert join_and("Bells ring.", "Paris street at night", nouns) == "Bells ring and Paris street at night"
    assert join_and("Bells ring.", "Dogs in a park", nouns) == "Bells ring and dogs in a park"
    assert join_and("Bells ring.", "The street at night", nouns) == "Bells ring and the street at night"


def test_concat_makes_two_sentences() -> None:
    assert concat("a dog barks", "a man walks") == "A dog barks. A man walks."
    assert concat("A dog barks.", "is that a man?") == "A dog barks. Is that a man?"
    assert concat("  A   dog barks ", "") == "A dog barks."


def test_empty_visual_caption_leaves_the_audio_caption_alone() -> None:
    for variant in VARIANTS:
        refs, sources = build_variant(variant, ["A dog barks"], "  ", clip_id="x", seed=0)
        assert sources == ["audio"], variant
        assert refs in (["A dog barks"], ["A dog barks."]), variant
    assert join_and("A dog barks.", "") == "A dog barks."  # nothing to join: left as it is
    assert pick_random("A dog barks", "", 0, "x") == ("A dog barks", "audio")
    assert pick_random("", "a car", 0, "x") == ("a car", "visual")


def test_per_modality_keeps_both_as_references() -> None:
    refs, sources = build_variant("per_modality", ["A dog barks", "Barking"], "a dog", clip_id="x", seed=0)
    assert refs == ["A dog barks", "Barking", "a dog"]
    assert sources == ["audio", "audio", "visual"]


def test_one_reference_per_audio_caption() -> None:
    audios = [f"Sound number {i}" for i in range(5)]
    refs, sources = build_variant("and", audios, "a red car", clip_id="x", seed=0)
    assert refs == [f"Sound number {i} and a red car" for i in range(5)]
    assert sources == ["audio+visual"] * 5


def test_random_is_seeded_per_clip_and_order_free() -> None:
    ids = [f"clip{i}" for i in range(400)]
    picks = {cid: pick_random("audio text", "visual text", 7, cid)[1] for cid in ids}
    again = {cid: pick_random("audio text", "visual text", 7, cid)[1] for cid in reversed(ids)}
    assert picks == again
    n_audio = sum(1 for v in picks.values() if v == "audio")
    assert 150 < n_audio < 250  # a fair coin over 400 clips
    other_seed = {cid: pick_random("audio text", "visual text", 8, cid)[1] for cid in ids}
    assert other_seed != picks


def test_unknown_variant_lists_the_valid_ones(tmp_path) -> None:
    with pytest.raises(UnknownVariant, match=r"'merged'.*valid variants: random, concat, and, per_modality"):
        check_variants(["and", "merged"])
    with pytest.raises(UnknownVariant):
        build_variant("sum", ["a"], "b", clip_id="x", seed=0)
    manifest = tmp_path / "m.yaml"
    manifest.write_text("export:\n  variants: [and, concat2]\n")
    valid = r"valid variants: random, concat, and"
    with pytest.raises(ConfigError, match=r"export\.variants.*'concat2'.*" + valid):
        load_config(RunConfig, manifest)
    with pytest.raises(ConfigError, match=r"export\.default_variant.*'best'"):
        load_config(RunConfig, manifest, ["export.variants=[and]", "export.default_variant=best"])
