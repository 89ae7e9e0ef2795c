"""YouTube needs a JavaScript runtime for yt-dlp to see every format: deno comes with the
pipeline (PyPI), and stage 1 stops at setup, with one line naming the fix, when yt-dlp finds none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import AbortRun
from pipeline.stage import RunContext
from stages.config import RunConfig
from stages.download.stage import DownloadStage
from stages.download.youtube import found_js_runtimes

LOCAL = "http://127.0.0.1:9/{id}.mp4"


def test_yt_dlp_in_the_venv_lists_deno() -> None:
    """What `yt-dlp -v` prints in the project's venv (the check the issue asks users to make)."""
    out = subprocess.run([sys.executable, "-m", "yt_dlp", "-v"], capture_output=True, text=True, timeout=120)
    debug = out.stderr
    assert "[debug] JS runtimes: deno-" in debug, debug
    assert "yt_dlp_ejs-" in debug  # the challenge solver scripts, from yt-dlp[default]
    assert found_js_runtimes(["deno"]) and found_js_runtimes(["deno"])[0].startswith("deno-")


def stage(tmp_path: Path, **download: object) -> DownloadStage:
    cfg = RunConfig(workdir=tmp_path / "run")
    cfg.download = cfg.download.model_copy(update=download)
    return DownloadStage(RunContext(tmp_path / "run", cfg))


def test_setup_stops_when_yt_dlp_finds_no_js_runtime(tmp_path: Path) -> None:
    missing = ["deno:/nonexistent/deno"]
    assert found_js_runtimes(missing) == []
    # On for YouTube URLs (the default url_template).
    with pytest.raises(AbortRun) as err:
        stage(tmp_path, js_runtimes=missing).setup()
    msg = str(err.value)
    assert "\n" not in msg and "JavaScript runtime" in msg
    assert "pip install 'yt-dlp[default]' deno" in msg and "require_js_runtime=false" in msg
    # Asked for explicitly on any URL.
    with pytest.raises(AbortRun, match="JavaScript runtime"):
        stage(tmp_path, js_runtimes=missing, url_template=LOCAL, require_js_runtime=True).setup()


def test_setup_passes_with_deno_or_when_not_required(tmp_path: Path) -> None:
    stage(tmp_path).setup()  # YouTube URL, deno from the venv: found
    stage(tmp_path, js_runtimes=["deno:/nonexistent/deno"], url_template=LOCAL).setup()  # off for local URLs
    stage(tmp_path, js_runtimes=["deno:/nonexistent/deno"], require_js_runtime=False).setup()
