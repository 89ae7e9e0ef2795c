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
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions, WholeStage
from pipeline.text import squash_spaces

if TYPE_CHECKING:
    import pyarrow as pa

# The rules of a CSV row, written once: the column-wise reader (Arrow's regex match) and the
# row-by-row reader that names bad lines (Python's) apply these same patterns, so they cannot
# disagree on what a valid row is. ASCII digits only (str.isdigit() takes other scripts' digits),
# and an audiocap_id fits in int64.
YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
AUDIOCAP_ID = re.compile(r"[0-9]{1,18}")
START_TIME = re.compile(r"[0-9]{1,9}(\.0*)?")  # whole seconds, "30" or "30.0"
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


def parse_manifest(cfg: ManifestConfig) -> tuple[pa.Table, dict[str, str]]:
    """Validate the CSVs and group their rows into clips. Returns (clips, file checksums).

    The clips are an Arrow table (``clip_id, youtube_id, start_s, split, audio_captions,
    audiocap_ids``, captions in file order). Files are read with Arrow's CSV reader and checked
    column-wise, which takes seconds and little memory for millions of rows; a file with any
    problem is read again row by row (:func:`_parse_rows`, the reference semantics) so every error
    names its file and line.
    """
    errors: list[str] = []
    sums: dict[str, str] = {}
    expected = None
    if cfg.checksums:
        sums_path = cfg.csv_dir / cfg.checksums
        if not sums_path.exists():
            raise AbortRun(f"checksum file not found: {sums_path} (set manifest.checksums: null to skip)")
        expected = read_checksums(sums_path)
    files: list[tuple[str, Path, bytes]] = []
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
        files.append((split, path, data))
    if errors:
        raise ManifestErrors(errors)
    table = _fast_clips(files, cfg.clip_seconds)
    if table is None:
        table = _slow_clips(files, cfg.clip_seconds)
    return table, sums


def _slow_clips(files: list[tuple[str, Path, bytes]], clip_seconds: int) -> pa.Table:
    """Row by row, with an error per bad row naming its file and line (raises if any)."""
    errors: list[str] = []
    clips: dict[str, _Clip] = {}
    seen_ids: dict[int, str] = {}
    for split, path, data in files:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            errors.append(f"{path}:{line}: non-UTF-8 byte 0x{data[exc.start]:02x}")
            continue
        errors.extend(_parse_rows(path, split, text, clip_seconds, clips, seen_ids))
    if errors:
        raise ManifestErrors(errors)
    return _clips_table(
        list(clips),
        [c.youtube_id for c in clips.values()],
        [c.start_s for c in clips.values()],
        [c.split for c in clips.values()],
        [c.captions for c in clips.values()],
        [c.ids for c in clips.values()],
    )


def _clips_table(
    ids: Any, youtube_ids: Any, starts: Any, splits: Any, captions: Any, audiocap_ids: Any
) -> pa.Table:
    import pyarrow as pa

    return pa.table(
        {
            "clip_id": pa.array(ids, pa.string()),
            "youtube_id": pa.array(youtube_ids, pa.string()),
            "start_s": pa.array(starts, pa.int32()),
            "split": pa.array(splits, pa.string()),
            "audio_captions": pa.array(captions, pa.list_(pa.string())),
            "audiocap_ids": pa.array(audiocap_ids, pa.list_(pa.int64())),
        }
    )


def _fast_clips(files: list[tuple[str, Path, bytes]], clip_seconds: int) -> pa.Table | None:
    """The clips of valid files, column-wise with Arrow; None if any row needs a closer look."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    tables: list[pa.Table] = []
    for split, _path, data in files:
        try:
            raw = pcsv.read_csv(
                pa.py_buffer(data),
                convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(REQUIRED_COLUMNS, pa.string()),
                    include_columns=list(REQUIRED_COLUMNS),
                    strings_can_be_null=False,
                ),
            )
            yt = pc.utf8_trim_whitespace(raw["youtube_id"])
            start_txt = pc.utf8_trim_whitespace(raw["start_time"])
            aid_txt = pc.utf8_trim_whitespace(raw["audiocap_id"])
            caption = raw["caption"]
            ascii_only = pc.all(pc.string_is_ascii(caption)).as_py() is not False
            if ascii_only:
                caption = pc.replace_substring_regex(pc.utf8_trim_whitespace(caption), r"\s+", " ")
            else:  # Python's notion of whitespace (NBSP...) is the reference
                caption = pa.array([squash_spaces(c) for c in caption.to_pylist()], pa.string())
            good = [
                pc.all(pc.match_substring_regex(yt, f"^{YOUTUBE_ID.pattern}$")),
                pc.all(pc.match_substring_regex(start_txt, f"^{START_TIME.pattern}$")),
                pc.all(pc.greater(pc.utf8_length(caption), 0)),
                pc.all(pc.match_substring_regex(aid_txt, f"^{AUDIOCAP_ID.pattern}$")),
            ]
            start = pc.cast(start_txt, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError):
            return None
        if not all(g.as_py() is not False for g in good):
            return None
        n = raw.num_rows
        tables.append(
            pa.table(
                {
                    "youtube_id": yt,
                    "start_s": pc.cast(start, pa.int64()),
                    "split": pa.array([split] * n, pa.string()) if n else pa.array([], pa.string()),
                    "caption": caption,
                    "audiocap_id": pc.cast(aid_txt, pa.int64()),
                    "row": pa.array(range(n), pa.int64()),
                    "file": pa.array([len(tables)] * n, pa.int32()),
                }
            )
        )
    if not tables:
        return _clips_table([], [], [], [], [], [])
    rows = pa.concat_tables(tables)
    del tables
    aids = rows["audiocap_id"].to_numpy()
    if len(np.unique(aids)) != len(aids):
        return None  # duplicate audiocap_id: the row-by-row pass names both lines
    start_ms = pc.cast(pc.multiply(rows["start_s"], 1000), pa.string())
    end_ms = pc.cast(pc.multiply(pc.add(rows["start_s"], clip_seconds), 1000), pa.string())
    rows = rows.append_column(
        "clip_id", pc.binary_join_element_wise(rows["youtube_id"], start_ms, end_ms, "_")
    )
    # Group by sorting (less memory than a hash aggregation of lists): rows of one clip end up
    # together, in file order, and each clip's captions are a slice of the sorted column.
    rows = rows.take(
        pc.sort_indices(rows, [("clip_id", "ascending"), ("file", "ascending"), ("row", "ascending")])
    )
    ids = rows["clip_id"].combine_chunks()
    n = len(ids)
    if n == 0:
        return _clips_table([], [], [], [], [], [])
    first = np.ones(n, dtype=bool)
    first[1:] = pc.not_equal(ids[1:], ids[:-1]).to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1  # each row's clip number
    splits = rows["split"].combine_chunks()
    if not pc.all(pc.equal(splits, splits.take(pa.array(starts[group])))).as_py():
        return None  # a clip in two splits: the row-by-row pass names the line
    offsets = pa.array(np.append(starts, n).astype(np.int32))
    heads = rows.take(pa.array(starts))
    return _clips_table(
        heads["clip_id"],
        heads["youtube_id"],
        pc.cast(heads["start_s"], pa.int32()),
        heads["split"],
        pa.ListArray.from_arrays(offsets, rows["caption"].combine_chunks()),
        pa.ListArray.from_arrays(offsets, rows["audiocap_id"].combine_chunks()),
    )


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
        caption = squash_spaces(row["caption"])
        aid_txt = (row["audiocap_id"] or "").strip()
        problems = []
        if not is_valid_youtube_id(yt):
            problems.append(f"malformed youtube_id {yt!r} (expected 11 of [A-Za-z0-9_-])")
        start = None
        if START_TIME.fullmatch(start_txt):
            start = int(float(start_txt))
        else:
            problems.append(f"start_time {start_txt!r} is not a non-negative whole number of seconds")
        if not caption:
            problems.append("empty caption")
        aid = None
        if not AUDIOCAP_ID.fullmatch(aid_txt):
            problems.append(f"audiocap_id {aid_txt!r} is not a whole number of at most 18 digits")
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


def select_clips(clips: pa.Table, cfg: ManifestConfig, limit: int | None) -> pa.Array:
    """Deterministic choice: per split (in config order) the clip ids sorted, or a seeded sample of
    them (if asked), then the first ``limit``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chosen = []
    for split in cfg.splits:
        ids = clips.filter(pc.equal(clips["split"], split))["clip_id"].combine_chunks()
        if cfg.sample_per_split is not None and cfg.sample_per_split < len(ids):
            sample = random.Random(f"{cfg.seed}:{split}").sample(
                sorted(ids.to_pylist()), cfg.sample_per_split
            )
            ids = pa.array(sample, pa.string())
        chosen.append(ids.take(pc.sort_indices(ids)))
    out = pa.concat_arrays(chosen) if chosen else pa.array([], pa.string())
    return out[:limit] if limit is not None else out


class ManifestStage(WholeStage[ManifestConfig]):
    number = 0
    name = "manifest"
    upstream = None
    description = "Ingest the AudioCaps CSVs into the clip table."

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
            n = ledger.latest_table(["status"]).num_rows
            if previous.get("fingerprint") == fingerprint:
                msg = f"nothing to do: the clip table ({n} clips) is up to date"
                return {**previous, "message": msg}
            raise AbortRun(
                f"the clip table in {ledger.folder} was built from other inputs or settings; "
                "rerun with --force to rebuild it (later stages keep their rows, keyed by clip_id)"
            )
        chosen = select_clips(clips, self.cfg, options.limit)
        table = self._ledger_table(clips, chosen, ledger.schema)
        del clips
        ledger.replace_all(table)
        counts = {str(v["values"]): int(v["counts"]) for v in table["split"].value_counts().to_pylist()}
        per_split = {s: counts.get(s, 0) for s in self.cfg.splits}
        n_captions = int(table["audio_captions"].combine_chunks().value_lengths().to_numpy().sum())
        return {
            "message": f"clip table built: {table.num_rows} clips "
            + ", ".join(f"{s} {n}" for s, n in per_split.items()),
            "fingerprint": fingerprint,
            "files": sums,
            "clips": table.num_rows,
            "per_split": per_split,
            "captions": n_captions,
        }

    def _ledger_table(self, clips: pa.Table, chosen: pa.Array, schema: pa.Schema) -> pa.Table:
        """The ledger rows of the chosen clips, in their order, built column-wise."""
        import time

        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipeline.fingerprint import content_fingerprints

        picked = clips.take(pc.index_in(chosen, value_set=clips["clip_id"].combine_chunks()))
        n = picked.num_rows
        empty = pa.array([""] * n, pa.string())
        columns = {
            "clip_id": picked["clip_id"],
            "status": pa.array(["ok"] * n, pa.string()),
            "reason": empty,
            "message": empty,
            "attempts": pa.array(np.ones(n, np.int32)),
            "seq": pa.array(np.ones(n, np.int64)),
            "updated_at": pa.array(np.full(n, time.time_ns() // 1000, np.int64)).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "youtube_id": picked["youtube_id"],
            "start_s": picked["start_s"],
            "end_s": pc.cast(pc.add(picked["start_s"], self.cfg.clip_seconds), pa.int32()),
            "split": picked["split"],
            "audio_captions": picked["audio_captions"],
            "audiocap_ids": picked["audiocap_ids"],
        }
        # Each clip row's fingerprint is of its content: a rebuilt table that changes a clip's
        # captions (or times, or split) makes everything made from it stale.
        content = ["clip_id", "youtube_id", "start_s", "end_s", "split", "audio_captions", "audiocap_ids"]
        columns["fingerprint"] = content_fingerprints(pa.table({c: columns[c] for c in content}), content)
        columns["layer_fingerprint"] = pa.nulls(n, pa.string())  # the clip table has no layer
        return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)

    def _previous_summary(self) -> dict[str, Any]:
        from pipeline.io import read_json

        stats, damaged = read_json(self.folder / "stats.json")
        if damaged:
            raise AbortRun(
                f"{damaged}: it records what the clip table was built from. `avcaps repair` moves it "
                "aside; then `avcaps run 0 --force` rebuilds the table (the same inputs give the same "
                "rows, and later stages keep theirs)"
            )
        summary: dict[str, Any] = stats.get("summary", {})
        return summary
