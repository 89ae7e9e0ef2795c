"""Readers for predictions and references.

Predictions: JSONL (one ``{"clip_id": ..., "caption": ...}`` per line) or CSV with a header
``clip_id,caption``. References, detected by path:

- an export folder (``DIR/export`` or a run folder holding one): Parquet files
  ``data/<config>/<split>-*.parquet`` with ``clip_id`` and a list column ``captions`` (or
  ``references``);
- a Parquet file with those columns;
- JSONL with ``clip_id`` and ``captions`` (a list) or ``caption`` (one line per reference);
- CSV with ``clip_id,caption`` (one row per reference);
- an AudioCaps CSV (``audiocap_id,youtube_id,start_time,caption``), clip ids built as the
  manifest stage builds them (``<youtube_id>_<start_ms>_<end_ms>``).

Every error names the file and the line or clip.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun
from pipeline.text import squash_spaces

AUDIOCAPS_COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")
REFERENCE_LIST_COLUMNS = ("captions", "references")


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """The objects of a JSONL file, each with its ``file:line`` for error messages."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AbortRun(f"{where}: not valid JSON ({exc.msg})") from None
        yield where, obj


def _clean(text: object, where: str) -> str:
    if not isinstance(text, str):
        raise AbortRun(f"{where}: caption is not a string ({text!r})")
    return squash_spaces(text)


def read_predictions(path: Path | str) -> dict[str, str]:
    """clip_id -> caption. Duplicate clip ids, missing columns and non-string captions are errors."""
    path = Path(path)
    if not path.is_file():
        raise AbortRun(f"predictions file not found: {path}")
    rows: list[tuple[str, object, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for where, obj in _jsonl(path):
            if not isinstance(obj, dict) or "clip_id" not in obj or "caption" not in obj:
                raise AbortRun(f"{where}: expected an object with 'clip_id' and 'caption'")
            rows.append((str(obj["clip_id"]), obj["caption"], where))
    elif path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"clip_id", "caption"} <= set(reader.fieldnames):
                raise AbortRun(f"{path}: CSV header must contain clip_id,caption (got {reader.fieldnames})")
            for n, row in enumerate(reader, start=2):
                rows.append((row["clip_id"], row["caption"], f"{path}:{n}"))
    else:
        raise AbortRun(f"{path}: predictions must be .jsonl or .csv")
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for clip_id, caption, where in rows:
        if clip_id in out:
            raise AbortRun(f"{where}: clip {clip_id} already has a prediction ({seen[clip_id]})")
        out[clip_id] = _clean(caption, f"{where} (clip {clip_id})")
        seen[clip_id] = where
    if not out:
        raise AbortRun(f"{path}: no predictions")
    return out


def find_export_files(root: Path, split: str, config_name: str | None) -> dict[str, list[Path]]:
    """config -> its Parquet files of one split, in an export folder (or a run folder holding
    ``export/``); all configs unless ``config_name`` picks one."""
    base = root / "export" if (root / "export" / "data").is_dir() else root
    data = base / "data"
    if not data.is_dir():
        raise AbortRun(f"{root}: no export found (expected {data})")
    configs = sorted(p.name for p in data.iterdir() if p.is_dir())
    if config_name is not None and config_name not in configs:
        raise AbortRun(f"{data}: no config {config_name!r} (have {configs})")
    out = {}
    for name in [config_name] if config_name else configs:
        files = sorted((data / name).glob(f"{split}-*.parquet"))
        if not files:
            raise AbortRun(f"{data / name}: no {split}-*.parquet files")
        out[name] = files
    if not out:
        raise AbortRun(f"{data}: no configs")
    return out


def _references_from_parquet(files: list[Path]) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    out: dict[str, list[str]] = {}
    for f in files:
        names = pq.read_schema(f).names
        column = next((c for c in REFERENCE_LIST_COLUMNS if c in names), None)
        if "clip_id" not in names or column is None:
            raise AbortRun(f"{f}: needs columns clip_id and one of {REFERENCE_LIST_COLUMNS}")
        # Only the two columns: an export may embed images and audio in other ones.
        table = pq.read_table(f, columns=["clip_id", column])
        for clip_id, refs in zip(
            table.column("clip_id").to_pylist(), table.column(column).to_pylist(), strict=True
        ):
            where = f"{f} (clip {clip_id})"
            if clip_id in out:
                raise AbortRun(f"{where}: clip appears twice")
            if not refs:
                raise AbortRun(f"{where}: no references")
            out[clip_id] = [_clean(r, where) for r in refs]
    return out


def _references_from_export(root: Path, split: str, config_name: str | None) -> dict[str, list[str]]:
    """The export's references of ``split``. The configs differ in their training captions only, so
    without ``--config-name`` every config must hold the same references (checked)."""
    by_config = {
        name: _references_from_parquet(files)
        for name, files in find_export_files(root, split, config_name).items()
    }
    (first, refs), *others = by_config.items()
    for name, other in others:
        if other != refs:
            raise AbortRun(
                f"{root}: the {split} references of configs {first!r} and {name!r} differ; "
                "choose one with --config-name"
            )
    return refs


def read_references(
    path: Path | str, split: str = "test", config_name: str | None = None
) -> dict[str, list[str]]:
    """clip_id -> reference captions (at least one each)."""
    from stages.manifest import clip_id_for

    path = Path(path)
    if path.is_dir():
        return _references_from_export(path, split, config_name)
    if not path.is_file():
        raise AbortRun(f"references not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _references_from_parquet([path])
    out: dict[str, list[str]] = {}
    if suffix in (".jsonl", ".json"):
        for where, obj in _jsonl(path):
            refs = obj.get("captions", obj.get("references")) if isinstance(obj, dict) else None
            if refs is None and isinstance(obj, dict) and "caption" in obj:
                refs = [obj["caption"]]
            if not isinstance(obj, dict) or "clip_id" not in obj or not isinstance(refs, list) or not refs:
                raise AbortRun(f"{where}: expected 'clip_id' and 'captions' (a non-empty list) or 'caption'")
            out.setdefault(str(obj["clip_id"]), []).extend(_clean(r, where) for r in refs)
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = set(reader.fieldnames or [])
            audiocaps = set(AUDIOCAPS_COLUMNS) <= fields
            if not audiocaps and not {"clip_id", "caption"} <= fields:
                raise AbortRun(
                    f"{path}: CSV header must be clip_id,caption or {','.join(AUDIOCAPS_COLUMNS)}"
                    f" (got {reader.fieldnames})"
                )
            for n, row in enumerate(reader, start=2):
                where = f"{path}:{n}"
                if audiocaps:
                    try:
                        clip_id = clip_id_for(row["youtube_id"], int(row["start_time"]))
                    except ValueError:
                        raise AbortRun(
                            f"{where}: start_time {row['start_time']!r} is not an integer"
                        ) from None
                else:
                    clip_id = row["clip_id"]
                out.setdefault(clip_id, []).append(_clean(row["caption"], where))
    else:
        raise AbortRun(f"{path}: references must be an export folder, .parquet, .jsonl or .csv")
    if not out:
        raise AbortRun(f"{path}: no references")
    return out
