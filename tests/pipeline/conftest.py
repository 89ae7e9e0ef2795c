from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # engine_helpers and the toy application


@pytest.fixture
def toyapp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Plug the toy application into the engine for this test."""
    monkeypatch.setenv("AVCAPS_APP", "toyapp")
    yield
