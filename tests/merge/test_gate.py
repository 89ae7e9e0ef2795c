"""The quality gate on crafted answers: each one has an expected verdict."""

from __future__ import annotations

import json

import pytest

from stages.merge.gate import GateSettings, check_answer, content_words, overlap, parse_answer

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
    ],
)
def test_verdicts(raw: str, reason: str) -> None:
    v = check_answer(raw, AUDIO, VISUAL, S)
    assert v.reason == reason, v
    assert v.ok == (reason == "ok")


def test_good_answer_figures() -> None:
    v = check_answer(json.dumps({"caption": GOOD}), AUDIO, VISUAL, S)
    assert v.parsed == "json" and v.caption == GOOD and v.words == 12
    assert v.audio_overlap == 1.0 and v.visual_overlap == 0.8  # "standing" is dropped
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
