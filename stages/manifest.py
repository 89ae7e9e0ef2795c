"""Stage 0: ingest AudioCaps-style CSVs into the clip table.

Input: CSV files with the columns ``audiocap_id,youtube_id,start_time,caption`` (AudioCaps 1.0, or
a user's own subset with the same columns), one file per split, optionally checked against a
``SHA256SUMS`` file on every read. Output: one ledger row per clip, with ``clip_id`` =
``<youtube_id>_<start_ms>_<end_ms>``. Any bad row stops the stage with errors naming the file, line
and problem, and nothing is written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import AbortRun
from pipeline.stage import RunOptions, WholeStage

if TYPE_CHECKING:
    import pyarrow as pa

YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
REQUIRED_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
MAX_REPORTED_ERRORS = 50


class ManifestConfig(StrictModel):
    csv_dir: Path = Field(Path("manifests/audiocaps"), description="Folder holding the split CSVs.")
    splits: dict[str, str] = Field(
        {"train": "train.csv", "val": "val.csv", "test": "test.csv"},
        description="Split name -> CSV file name in csv_dir.",
    )
    checksums: str | None = Field(
        "SHA256SUMS", description="sha256sum-format file in csv_dir checked on every read; null to skip."
    )
    sample_per_split: int | None = Field(None, gt=0, description="Seeded sample of N clips per split.")
    seed: int = Field(0, description="Seed of the per-split sample.")
    clip_seconds: int = Field(10, gt=0, description="Clip length after start_time.")


def clip_id_for(youtube_id: str, start_s: int, clip_seconds: int = 10) -> str:
    """``<yt>_<start_ms>_<end_ms>``, the naming LAVCap's loaders read."""
    return f"{youtube_id}_{start_s * 1000}_{(start_s + clip_seconds) * 1000}"


def is_valid_youtube_id(text: str) -> bool:
    return YOUTUBE_ID.fullmatch(text) is not None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checksums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if not m:
            raise AbortRun(f"{path}:{n}: not a sha256sum line: {line!r}")
        sums[m.group(2)] = m.group(1)
    return sums


@dataclass
class _Clip:
    youtube_id: str
    start_s: int
    split: str
    captions: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


class ManifestErrors(AbortRun):
    def __init__(self, errors: list[str]) -> None:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        super().__init__(
            f"the manifest has {len(errors)} problem(s); nothing was written:\n  " + "\n  ".join(shown) + more
        )
        self.errors = errors


def parse_manifest(cfg: ManifestConfig) -> tuple[dict[str, _Clip], dict[str, str]]:
    """Validate and group the CSV rows into clips. Returns (clips by clip_id, file checksums)."""
    errors: list[str] = []
    sums: dict[str, str] = {}
    expected = None
    if cfg.checksums:
        sums_path = cfg.csv_dir / cfg.checksums
        if not sums_path.exists():
            raise AbortRun(f"checksum file not found: {sums_path} (set manifest.checksums: null to skip)")
        expected = read_checksums(sums_path)
    clips: dict[str, _Clip] = {}
    seen_ids: dict[int, str] = {}
    for split, name in cfg.splits.items():
        path = cfg.csv_dir / name
        if not path.exists():
            raise AbortRun(f"manifest file not found: {path} (split {split!r})")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        sums[name] = digest
        if expected is not None:
            if name not in expected:
                errors.append(f"{path}: not listed in {cfg.checksums}")
                continue
            if expected[name] != digest:
                errors.append(
                    f"{path}: checksum mismatch (expected {expected[name][:12]}..., "
                    f"got {digest[:12]}...): the file changed since {cfg.checksums} was made"
                )
                continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            errors.append(f"{path}:{line}: non-UTF-8 byte 0x{data[exc.start]:02x}")
            continue
        errors.extend(_parse_rows(path, split, text, cfg.clip_seconds, clips, seen_ids))
    if errors:
        raise ManifestErrors(errors)
    return clips, sums


def _parse_rows(
    path: Path, split: str, text: str, clip_seconds: int, clips: dict[str, _Clip], seen_ids: dict[int, str]
) -> list[str]:
    errors: list[str] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        return [f"{path}:1: missing column(s) {', '.join(missing)} (have: {', '.join(header) or 'none'})"]
    for row in reader:
        where = f"{path}:{reader.line_num}"
        yt = (row["youtube_id"] or "").strip()
        start_txt = (row["start_time"] or "").strip()
        caption = " ".join((row["caption"] or "").split())
        aid_txt = (row["audiocap_id"] or "").strip()
        problems = []
        if not is_valid_youtube_id(yt):
            problems.append(f"malformed youtube_id {yt!r} (expected 11 of [A-Za-z0-9_-])")
        start = None
        try:
            value = float(start_txt)
            if value < 0 or value != int(value):
                raise ValueError
            start = int(value)
        except ValueError:
            problems.append(f"start_time {start_txt!r} is not a non-negative whole number of seconds")
        if not caption:
            problems.append("empty caption")
        aid = None
        if not aid_txt.isdigit():
            problems.append(f"audiocap_id {aid_txt!r} is not a positive integer")
        else:
            aid = int(aid_txt)
            if aid in seen_ids:
                problems.append(f"duplicate audiocap_id {aid} (first seen at {seen_ids[aid]})")
            else:
                seen_ids[aid] = where
        if problems:
            errors.extend(f"{where}: {p}" for p in problems)
            continue
        assert start is not None and aid is not None
        cid = clip_id_for(yt, start, clip_seconds)
        clip = clips.get(cid)
        if clip is None:
            clip = clips[cid] = _Clip(yt, start, split)
        elif clip.split != split:
            errors.append(f"{where}: clip {cid} is in split {split!r} and also in {clip.split!r}")
            continue
        clip.captions.append(caption)
        clip.ids.append(aid)
    return errors


def select_clips(clips: dict[str, _Clip], cfg: ManifestConfig, limit: int | None) -> list[str]:
    """Deterministic choice: a seeded sample per split (if asked), then the first ``limit``."""
    chosen: list[str] = []
    for split in cfg.splits:
        ids = sorted(cid for cid, c in clips.items() if c.split == split)
        if cfg.sample_per_split is not None and cfg.sample_per_split < len(ids):
            ids = sorted(random.Random(f"{cfg.seed}:{split}").sample(ids, cfg.sample_per_split))
        chosen.extend(ids)
    return chosen[:limit] if limit is not None else chosen


class ManifestStage(WholeStage):
    number = 0
    name = "manifest"
    upstream = None
    description = "Ingest the AudioCaps CSVs into the clip table."

    @property
    def cfg(self) -> ManifestConfig:
        return self.config.manifest  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("youtube_id", pa.string()),
            pa.field("start_s", pa.int32()),
            pa.field("end_s", pa.int32()),
            pa.field("split", pa.string()),
            pa.field("audio_captions", pa.list_(pa.string())),
            pa.field("audiocap_ids", pa.list_(pa.int64())),
        ]

    def run(self, options: RunOptions) -> dict[str, Any]:
        from pipeline.runner import stage_ledger

        clips, sums = parse_manifest(self.cfg)
        fingerprint = hashlib.sha256(
            json.dumps(
                {"config": self.cfg.model_dump(mode="json"), "files": sums, "limit": options.limit},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        ledger = stage_ledger(self)
        previous = self._previous_summary()
        if ledger.exists() and not options.force:
            n = len(ledger.latest())
            if previous.get("fingerprint") == fingerprint:
                msg = f"nothing to do: the clip table ({n} clips) is up to date"
                return {**previous, "message": msg}
            raise AbortRun(
                f"the clip table in {ledger.folder} was built from other inputs or settings; "
                "rerun with --force to rebuild it (later stages keep their rows, keyed by clip_id)"
            )
        chosen = select_clips(clips, self.cfg, options.limit)
        rows = []
        for cid in chosen:
            c = clips[cid]
            rows.append(
                {
                    "clip_id": cid,
                    "status": "ok",
                    "reason": "",
                    "message": "",
                    "attempts": 1,
                    "youtube_id": c.youtube_id,
                    "start_s": c.start_s,
                    "end_s": c.start_s + self.cfg.clip_seconds,
                    "split": c.split,
                    "audio_captions": c.captions,
                    "audiocap_ids": c.ids,
                }
            )
        ledger.replace_all(rows)
        per_split = {s: sum(1 for cid in chosen if clips[cid].split == s) for s in self.cfg.splits}
        return {
            "message": f"clip table built: {len(rows)} clips "
            + ", ".join(f"{s} {n}" for s, n in per_split.items()),
            "fingerprint": fingerprint,
            "files": sums,
            "clips": len(rows),
            "per_split": per_split,
            "captions": sum(len(clips[c].captions) for c in chosen),
        }

    def _previous_summary(self) -> dict[str, Any]:
        stats = self.folder / "stats.json"
        if not stats.exists():
            return {}
        summary: dict[str, Any] = json.loads(stats.read_text()).get("summary", {})
        return summary
