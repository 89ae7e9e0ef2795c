"""Fixtures of the end-to-end test: the tiny stand-in models, built once per session (the Label
Studio server, ``ls_server``, is in ``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from standins.blip2 import build_tiny_blip2

    return build_tiny_blip2(tmp_path_factory.mktemp("models") / "blip2-tiny")


@pytest.fixture(scope="session")
def dog_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random chat model of ``standins.llm`` whose generation config allows two tokens,
    " dog" and the end token (not before the 4th token; forced at the last step of the budget).

    Its word salad would fail the merge gate's overlap checks at random; this one answers
    "dog dog ... dog" to every prompt, through the same chat template and ``generate`` call, so the
    gate decides from the clip's audio captions alone: a clip whose captions are about a dog passes
    ``min_audio_overlap``, one about a cat fails it (``gate_missing_audio``) on every retry.
    """
    from transformers import AutoTokenizer, GenerationConfig

    from standins.llm import build_tiny_chat_model

    model = build_tiny_chat_model(tmp_path_factory.mktemp("llm") / "dog-chat", REPO / "manifests/audiocaps")
    tok = AutoTokenizer.from_pretrained(model)
    (dog,) = tok.encode(" dog", add_special_tokens=False)
    gen = GenerationConfig.from_pretrained(model)
    gen.suppress_tokens = [i for i in range(len(tok)) if i not in (dog, tok.eos_token_id)]
    gen.min_new_tokens = 4
    gen.save_pretrained(model)
    return model
