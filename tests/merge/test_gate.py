"""The quality gate on crafted answers: each one has an expected verdict (the labelled set of real
AudioCaps captions is in test_gate_set.py)."""

from __future__ import annotations

import json

import pytest

from stages.merge.gate import (
    GateSettings,
    check_answer,
    content_words,
    invented_words,
    overlap,
    parse_answer,
    strip_chatter,
)

AUDIO = "A dog barks repeatedly while a man speaks"
VISUAL = "a man standing in a backyard with a brown dog"
GOOD = "A man speaks in a backyard while a brown dog barks repeatedly"
S = GateSettings(max_words=20, min_words=3, min_audio_overlap=0.5, min_visual_overlap=0.5)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (json.dumps({"caption": GOOD}), "ok"),
        (f"```json\n{json.dumps({'caption': GOOD})}\n```", "ok"),
        (GOOD, "ok"),  # a plain answer is recoverable
        (f'"{GOOD}"', "ok"),
        ("", "empty"),
        ("   \n ", "empty"),
        (json.dumps({"caption": ""}), "empty"),
        ('{"caption": "A man speaks', "invalid_json"),
        ('{"text": "A man speaks"}', "invalid_json"),
        ("[1, 2]", "invalid_json"),
        (json.dumps({"caption": " ".join([GOOD] * 3)}), "too_long"),
        (json.dumps({"caption": "Dog barks"}), "too_short"),
        (json.dumps({"caption": "I'm sorry, but I cannot help with that request"}), "refusal"),
        ("As an AI language model I will not do that", "refusal"),
        (json.dumps({"caption": "The image shows a man and a dog barking while he speaks"}), "meta_text"),
        (json.dumps({"caption": "Merged caption of a man speaking and a dog barking"}), "meta_text"),
        (json.dumps({"caption": "A dog barks repeatedly while a man speaks loudly"}), "missing_visual"),
        (json.dumps({"caption": "A man stands in a backyard with a brown dog"}), "missing_audio"),
        ("First I think about it.\nThen the answer: a man and a dog", "unparsable"),
        # Chatter around a clean caption is stripped; around anything else it is refused.
        (f"Sure! Here is the merged result: {GOOD}", "ok"),
        (f"Here is the merged caption:\n\n{GOOD}.\n\nLet me know if you want changes!", "ok"),
        (json.dumps({"caption": f"Certainly, merged caption: {GOOD}"}), "ok"),
        (f"{GOOD} (this caption keeps every sound and every visible thing)", "ok"),
        (f"Sure! Here it is: {GOOD}. The dog is brown: the man owns it.", "chatter"),
        (f"Sure! Here is the merged result:\n{GOOD}\nand also a cat", "unparsable"),
        # Invented content: a cat, a ball and a sunset appear in neither caption.
        (json.dumps({"caption": f"{GOOD} at a cat chasing a ball at sunset"}), "invented"),
        (json.dumps({"caption": GOOD.replace("speaks", "talks")}), "ok"),
    ],
)
def test_verdicts(raw: str, reason: str) -> None:
    v = check_answer(raw, AUDIO, VISUAL, S)
    assert v.reason == reason, v
    assert v.ok == (reason == "ok")
    if v.ok:  # what is kept is the caption itself, chatter and punctuation stripped
        assert v.caption is not None and v.caption.rstrip(".") in (GOOD, GOOD.replace("speaks", "talks"))


def test_cut_off_answer_is_truncated_even_when_it_parses() -> None:
    v = check_answer(json.dumps({"caption": GOOD}), AUDIO, VISUAL, S, finish_reason="length")
    assert (v.ok, v.reason, v.finish_reason) == (False, "truncated", "length")
    assert v.audio_overlap == 1.0  # the figures are kept for audit
    cut = check_answer('{"caption": "A man sp', AUDIO, VISUAL, S, finish_reason="length")
    assert cut.reason == "truncated" and cut.caption is None
    assert (
        check_answer('{"caption": "A man sp', AUDIO, VISUAL, S, finish_reason="stop").reason == "invalid_json"
    )
    assert check_answer("", AUDIO, VISUAL, S, finish_reason="length").reason == "truncated"


def test_chatter_is_stripped_only_around_a_clean_caption() -> None:
    rest, removed, ok = strip_chatter("Sure! Here is the merged result: A dog barks in a park")
    assert (rest, removed, ok) == ("A dog barks in a park", ["Sure!", "Here is the merged result:"], True)
    v = check_answer("Sure! Here is the merged result: A dog barks in a park", "A dog barks", "a park", S)
    assert (
        v.ok
        and v.caption == "A dog barks in a park"
        and v.stripped == ["Sure!", "Here is the merged result:"]
    )
    # Nothing to strip: a caption that merely starts with "Great" stays whole.
    assert strip_chatter("Great crowds cheer and a dog barks") == (
        "Great crowds cheer and a dog barks",
        [],
        True,
    )
    assert strip_chatter("Okay: a dog barks. A man talks: loudly.")[2] is False


def test_invented_words_and_allowances() -> None:
    sources = ["A dog barks repeatedly", "a man standing in a large backyard"]
    assert invented_words("A man stands in a big backyard as a dog barks repeatedly", sources) == ([], 0.0)
    # Connective scene words and free variants are no inventions; a new animal and a place are.
    assert invented_words("In the background a dog barks repeatedly near a man", sources)[0] == []
    words, share = invented_words("A dog barks repeatedly at a cat in a kitchen", sources)
    assert words == ["cat", "kitchen"] and share == 2 / 5
    # Sizes count as named only when a caption names one.
    assert invented_words("A big dog barks", ["A dog barks"])[0] == ["big"]
    # A colour is content: it must come from a caption.
    assert invented_words("A red dog barks", ["A dog barks", "a brown dog"])[0] == ["red"]
    assert invented_words("", sources) == ([], 0.0)


def test_invented_threshold_is_configurable() -> None:
    answer = json.dumps({"caption": f"{GOOD} at a cat"})
    assert check_answer(answer, AUDIO, VISUAL, S).ok  # 1 of 8 content words
    strict = GateSettings(
        max_words=20, min_words=3, min_audio_overlap=0.5, min_visual_overlap=0.5, max_invented=0.1
    )
    v = check_answer(answer, AUDIO, VISUAL, strict)
    assert v.reason == "invented" and v.invented == ["cat"] and v.invented_share == 0.125


def test_all_captions_form_counts_the_best_reference_and_every_source() -> None:
    audios = ["A cat meows", "A dog barks repeatedly while a man speaks"]
    v = check_answer(json.dumps({"caption": GOOD}), audios, VISUAL, S)
    assert v.ok and v.audio_overlap == 1.0
    both = check_answer(json.dumps({"caption": f"{GOOD} and a cat meows"}), audios, VISUAL, S)
    assert both.ok and both.invented == []


def test_good_answer_figures() -> None:
    v = check_answer(json.dumps({"caption": GOOD}), AUDIO, VISUAL, S)
    assert v.parsed == "json" and v.caption == GOOD and v.words == 12
    assert v.audio_overlap == 1.0 and v.visual_overlap == 0.8  # "standing" is dropped
    assert v.invented == [] and v.invented_share == 0.0 and v.gate_version == 2
    assert json.loads(json.dumps(v.as_dict()))["reason"] == "ok"


def test_thresholds_are_configurable() -> None:
    only_audio = json.dumps({"caption": "A dog barks repeatedly while a man speaks loudly"})
    assert check_answer(only_audio, AUDIO, VISUAL, S).reason == "missing_visual"
    relaxed = GateSettings(max_words=20, min_words=3, min_audio_overlap=0.5, min_visual_overlap=0.0)
    assert check_answer(only_audio, AUDIO, VISUAL, relaxed).ok


def test_stemming_and_stop_words() -> None:
    assert content_words("The dogs are barking") == {"dog", "bark"}
    assert overlap("a dog barked", "dogs bark") == 1.0
    assert overlap("", "anything") == 1.0
    assert overlap("engine running", "a cat") == 0.0
    # -e plurals (the v1 stemmer left "horse"/"hors" apart), irregular plurals, verb forms.
    for a, b in [
        ("horses", "horse"),
        ("engines", "engine"),
        ("vehicles", "vehicle"),
        ("voices", "voice"),
        ("men", "man"),
        ("children", "child"),
        ("flies", "flying"),
        ("idles", "idling"),
        ("loudly", "loud"),
    ]:
        assert content_words(a) == content_words(b), (a, b)
    lossless = "A horse neighs, an engine of a vehicle idles and a voice speaks"
    assert overlap("Horses neigh and a vehicle engine idles while voices speak", lossless) == 1.0
    assert overlap("A man speaks", "A man talks") == 1.0  # free variants


def test_parse_answer_modes() -> None:
    assert parse_answer('{"caption": "x y z"}') == ("x y z", "json")
    assert parse_answer("x y z") == ("x y z", "plain")
    assert parse_answer('{"caption": 3}') == (None, "none")
    # A raw control character inside the JSON string (grammar-constrained decoding lets one through).
    assert parse_answer('{"caption": "a\x1d dog\tbarks  "}') == ("a dog barks", "json")


def test_harmony_final_channel() -> None:
    from stages.merge.backends import harmony_final

    text = (
        "<|channel|>analysis<|message|>Keep the dog and the yard.<|end|><|start|>assistant"
        '<|channel|>final<|message|>{"caption": "A dog barks in a yard"}<|return|>'
    )
    assert harmony_final(text) == '{"caption": "A dog barks in a yard"}'
    assert harmony_final("a plain answer") is None
