"""Stage 1's pace and breaker file and stage 5's project.json when damaged (cut short, zero bytes,
random bytes): a rebuild named in the log, or a one-line error naming the file; never a traceback
(issue 26)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from pipeline.errors import AbortRun
from stages.download.limits import GateSettings, StartGate, breaker_summary, host_name
from stages.review.connection import PROJECT_FILE, read_project_file

DAMAGE = {
    "cut short": lambda text: text[: len(text) // 2].encode(),
    "zero bytes": lambda text: b"",
    "random bytes": lambda text: os.urandom(len(text)),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_breaker_file_starts_afresh_and_says_so(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "01-download" / "limits"
    gate = StartGate(folder, GateSettings())
    gate.report(gate.acquire(), None)
    state = folder / f"{host_name()}.json"
    state.write_bytes(DAMAGE[how](state.read_text()))

    with caplog.at_level(logging.WARNING, logger="avcaps"):
        summary = breaker_summary(folder)
        again = StartGate(folder, GateSettings())
        again.report(again.acquire(), None)
    assert summary[host_name()]["state"] == "closed"
    assert f"{state}: unreadable" in caplog.text
    assert json.loads(state.read_text())["starts"] == 1  # rewritten whole by the next start


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_project_file_is_named(tmp_path: Path, how: str) -> None:
    folder = tmp_path / "05-review"
    folder.mkdir()
    text = json.dumps({"token": "ab12cd34", "title": "AudioVisualCaps run [ab12cd34]", "project_id": 7})
    (folder / PROJECT_FILE).write_bytes(DAMAGE[how](text))
    with pytest.raises(AbortRun) as err:
        read_project_file(folder)
    message = str(err.value)
    assert f"{folder / PROJECT_FILE} is damaged" in message and '{"project_id": ID}' in message
    assert "\n" not in message
