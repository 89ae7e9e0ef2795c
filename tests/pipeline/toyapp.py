"""A toy application for engine tests: the real stage 0 plus a toy item stage.

Plugged in with ``AVCAPS_APP=toyapp`` (this folder on ``sys.path``). The toy stage's behaviour per
clip is driven by a JSON "script" file, so a test can make items fail permanently, fail
transiently for k attempts, raise unexpected errors, stop the run with the results it has
(``throttle``), or be slow (to be killed mid-run). Every call
of ``process`` appends the clip ids it worked on to a log, so tests can count real work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field

from pipeline.config import RunConfigBase, StageConfig
from pipeline.errors import AbortRun, PermanentError, RunThrottled, TransientError
from pipeline.io import atomic_write_text, temp_name
from pipeline.stage import Item, ItemStage, Result
from stages.manifest import ManifestConfig

STAGES = ["stages.manifest:ManifestStage", "toyapp:ToyStage"]
CONFIG_MODEL = "toyapp:ToyConfig"
COMMANDS: dict[str, str] = {}
GROUP_COLUMN = "split"  # the real stage 0's clips have splits: status counts per split


class ToySection(StageConfig):
    script: Path | None = Field(None, description="JSON {clip_id: behaviour}.")
    work_log: Path | None = None
    sleep_s: float = 0.0
    only_split: str | None = None
    write_file: bool = Field(True, description="Write a media file per ok item (off: pure engine cost).")
    flavour: str = Field("plain", description="A setting that changes the output (fingerprinted).")
    neutral: str = Field("a", description="A fingerprinted setting that leaves the output as it is.")
    order: str = Field("table", description="table | reverse | broken (not a permutation): ToyStage.order.")
    file_bytes: int = Field(0, description="Pad each item's media file to this many bytes (fills a disk).")
    writer: str = Field(
        "python",
        description="python | subprocess: a child process writes the file and only its exit code tells "
        "that it failed (as ffmpeg under yt-dlp does): the item fails transiently.",
    )


class ToyConfig(RunConfigBase):
    workdir: Path = Path("runs/toy")
    manifest: ManifestConfig = ManifestConfig()
    toy: ToySection = ToySection()


class ToyStage(ItemStage):
    number = 1
    name = "toy"
    upstream = "manifest"

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        return [pa.field("toy_out", pa.string()), pa.field("toy_file", pa.string())]

    selection_columns = ("split",)

    def select(self, table: Any) -> Any:
        only = self.stage_config.only_split  # type: ignore[attr-defined]
        return None if only is None else table["split"] == only

    def fingerprint_settings(self) -> dict[str, Any]:
        cfg = self.stage_config
        return {"flavour": cfg.flavour, "neutral": cfg.neutral}  # type: ignore[attr-defined]

    def legacy_fingerprint_settings(self) -> list[dict[str, Any]]:
        return [{"flavour": self.stage_config.flavour}]  # type: ignore[attr-defined]

    def order(self, table: pa.Table) -> Any:
        how = self.stage_config.order  # type: ignore[attr-defined]
        if how == "reverse":
            return list(range(table.num_rows))[::-1]
        return [0] * table.num_rows if how == "broken" else None

    def setup(self) -> None:
        cfg = self.stage_config
        self.script: dict[str, Any] = json.loads(cfg.script.read_text()) if cfg.script else {}  # type: ignore[attr-defined]

    def process(self, batch: list[Item]) -> list[Result]:
        cfg = self.stage_config
        if cfg.work_log:  # type: ignore[attr-defined]
            with open(cfg.work_log, "a") as fh:  # type: ignore[attr-defined]
                fh.write("".join(f"{it.clip_id} {os.getpid()}\n" for it in batch))
                fh.flush()
                os.fsync(fh.fileno())
        out = []
        for it in batch:
            if cfg.sleep_s:  # type: ignore[attr-defined]
                time.sleep(cfg.sleep_s)  # type: ignore[attr-defined]
            how = self.script.get(it.clip_id, "ok")
            if how == "permanent":
                out.append(Result.failed(it.clip_id, PermanentError("removed", "gone for good")))
            elif how.startswith("transient:"):
                fails = int(how.split(":")[1])
                if it.attempt <= fails:
                    out.append(Result.failed(it.clip_id, TransientError("http_429", "slow down")))
                else:
                    out.append(self._ok(it))
            elif how == "boom":
                raise ValueError(f"boom on {it.clip_id}")
            elif how == "exhaust_fds":
                # A real EMFILE from the kernel: open files until it refuses, then let go of them.
                held = []
                try:
                    while True:
                        held.append(open(os.devnull))  # noqa: SIM115
                finally:
                    for fh in held:
                        fh.close()
            elif how == "memory":
                bytearray(1 << 62)  # a real MemoryError: no machine has 4 EiB
            elif how == "abort":
                raise AbortRun("the toy model is missing")
            elif how == "throttle":
                # Stop the run; the items before this one in the batch are done, this one and
                # those after it were never tried.
                raise RunThrottled("the toy source refuses this host", results=out)
            else:
                out.append(self._ok(it))
        return out

    def _write_in_child(self, path: Path, text: str) -> str | None:
        """Write ``path`` from a child process through the temp folder; what failed, or None."""
        self.ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.ctx.tmp_dir / temp_name(path.name)
        code = "import sys; open(sys.argv[1], 'w').write(sys.stdin.read())"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp)], input=text, text=True, capture_output=True
        )
        if proc.returncode:
            tmp.unlink(missing_ok=True)
            return f"the writer exited with code {proc.returncode}"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return None

    def _ok(self, it: Item) -> Result:
        rel = None
        cfg = self.stage_config
        if cfg.write_file:  # type: ignore[attr-defined]
            path = self.ctx.media_dir / "toy" / f"{it.clip_id}.txt"
            text = it.data["audio_captions"][0].ljust(cfg.file_bytes)  # type: ignore[attr-defined]
            if cfg.writer == "subprocess":  # type: ignore[attr-defined]
                failed = self._write_in_child(path, text)
                if failed:
                    return Result.failed(it.clip_id, TransientError("tool_failed", failed))
            else:
                atomic_write_text(path, text, self.ctx.tmp_dir)
            rel = str(path.relative_to(self.ctx.workdir))
        flavour = self.stage_config.flavour  # type: ignore[attr-defined]
        out = f"{it.data['split']}:{it.attempt}" + ("" if flavour == "plain" else f":{flavour}")
        return Result.ok(it.clip_id, toy_out=out, toy_file=rel)
