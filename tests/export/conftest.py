"""Fixtures of the export/publish tests: run folders written to the column contract."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stages.caption.stage import CaptionStage
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.merge.stage import MergeStage
from standins.contract_run import ContractRun, Pick, build_contract_run
from standins.run_history import Failure

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests resolve relative paths against the current directory (the repo root)."""
    monkeypatch.chdir(REPO)


# What the base run holds besides a retried clip in every stage (standins.contract_run.RETRY_CYCLE):
# a clip that ends failed in each stage, one of them after running out of transient retries.
BASE_FAILURES: dict[Pick, Failure] = {
    ("train", 0): Failure(DownloadStage, "private"),
    ("train", 1): Failure(CaptionStage, "corrupt_frame"),
    ("val", 0): Failure(KeyframesStage, "corrupt_video"),
    ("val", 1): Failure(DownloadStage, "http_429", "failed_transient"),
    ("test", 0): Failure(DownloadStage, "removed"),
    ("test", 3): Failure(MergeStage, "gate_missing_visual"),
}
BASE_VERDICTS: dict[Pick, str | None] = {("test", 1): "edited", ("test", 2): "rejected"}


@pytest.fixture(scope="session")
def base_contract(tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    """One contract run: 6 clips per split, :data:`BASE_FAILURES`, retries, every review verdict."""
    old = os.getcwd()
    os.chdir(REPO)
    try:
        workdir = tmp_path_factory.mktemp("run") / "run"
        return build_contract_run(workdir, failures=BASE_FAILURES, verdicts=BASE_VERDICTS)
    finally:
        os.chdir(old)


@pytest.fixture(scope="session")
def base_run(base_contract: ContractRun) -> Path:
    return base_contract.workdir


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Callable[..., Path]:
    """A fresh copy of the base run folder (tests change it)."""

    def make(name: str = "run") -> Path:
        dest = tmp_path / name
        shutil.copytree(base_run, dest)
        return dest

    return make


def context(workdir: Path, *overrides: str) -> Any:
    from pipeline.cli import load_context

    return load_context(REPO / "manifests/audiocaps.yaml", workdir, tuple(overrides))


@pytest.fixture
def export() -> Callable[..., Path]:
    """Run stage 6 through the real runner; returns the export folder."""
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.export.stage import ExportStage

    def run(workdir: Path, *overrides: str) -> Path:
        ctx = context(workdir, *overrides)
        run_stage(ExportStage, ctx, RunOptions(progress=False))
        return workdir / "export"

    return run


class FakeHub:
    """A FAKE of the Hugging Face Hub's HTTP API on 127.0.0.1 (the real Hub cannot be reached).

    It speaks just enough of the protocol that ``huggingface_hub`` uses for create_repo,
    validate-yaml, preupload (every file answered as a regular, inline upload), commit (NDJSON
    with base64 contents) and tag, and records every request. ``refuse`` maps a path fragment to an
    HTTP status to answer instead.
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[dict[str, Any]] = []
        self.refuse: dict[str, int] = {}
        self.repos: dict[str, dict[str, bytes]] = {}  # repo -> path -> content, as commits left it
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                import json

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                code, out = 200, hub.reply(self.path, body)
                for fragment, status in hub.refuse.items():
                    if fragment in self.path:
                        code, out = status, {"error": f"refused by the fake Hub ({fragment})"}
                data = json.dumps(out).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reply(self, path: str, body: bytes) -> Any:
        import base64
        import json

        if "/tree/" in path:  # list_repo_files: the repo's files as the commits left them
            repo = path.split("/api/datasets/")[1].split("/tree/")[0]
            return [
                {"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                for p, b in sorted(self.repos.get(repo, {}).items())
            ]
        if path == "/api/repos/create":
            req = json.loads(body)
            return {"url": f"{self.url}/datasets/{req['organization']}/{req['name']}"}
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            }
        if "/commit/" in path:
            repo = path.split("/api/datasets/")[1].split("/commit/")[0]
            files = self.repos.setdefault(repo, {".gitattributes": b"*.parquet filter=lfs\n"})
            for line in body.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                elif entry["key"] == "deletedFile":
                    files.pop(entry["value"]["path"], None)
            return {"commitOid": "c" * 40, "commitUrl": f"{self.url}/datasets/{repo}/commit/{'c' * 40}"}
        return {}

    def deleted_files(self) -> list[str]:
        """Paths deleted by commit requests, in order."""
        import json

        out = []
        for req in self.requests:
            if "/commit/" in req["path"]:
                for line in req["body"].decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "deletedFile":
                        out.append(entry["value"]["path"])
        return out

    def committed_files(self) -> dict[str, bytes]:
        """Path -> content of every file sent in commit requests."""
        import base64
        import json

        files: dict[str, bytes] = {}
        for req in self.requests:
            if "/commit/" not in req["path"]:
                continue
            for line in req["body"].decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
        return files

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub() -> Any:
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.fixture
def publish() -> Callable[..., dict[str, Any]]:
    """Run stage 7 through the real runner; returns the summary saved in its stats.json."""
    import json

    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.publish import PublishStage

    def run(workdir: Path, *overrides: str, force: bool = False) -> dict[str, Any]:
        run_stage(PublishStage, context(workdir, *overrides), RunOptions(progress=False, force=force))
        return json.loads((workdir / "07-publish" / "stats.json").read_text())["summary"]

    return run
