"""Stage 6, writing: the Parquet shards (with the media where embedded), ``statistics.json``, the
licence, figures and card, the checksums, and the swap of the finished folder into place."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io import atomic_write_text, file_digest
from stages.export.card import render_card, validate_card
from stages.export.config import ExportConfig
from stages.export.plan import HF_SPLITS
from stages.export.rows import MEDIA_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa


def _with_media(row: dict[str, Any], workdir: Path) -> dict[str, Any]:
    media = {}
    for column, key in MEDIA_COLUMNS:
        path = workdir / row[key]
        media[column] = {"bytes": path.read_bytes(), "path": path.name}
    return {**row, **media}


def _row_bytes(row: dict[str, Any], workdir: Path, embed: bool) -> int:
    """Uncompressed size of a row: its text, plus its media files when they are embedded."""
    size = len(json.dumps(row, default=str))
    if embed:
        size += sum((workdir / row[key]).stat().st_size for _, key in MEDIA_COLUMNS)
    return size


def write_configs(
    rows_by_variant: dict[str, dict[str, list[dict[str, Any]]]],
    folder: Path,
    schema: pa.Schema,
    max_bytes: int,
    workdir: Path,
    embed: bool,
) -> dict[str, dict[str, list[str]]]:
    """Every config's shards in ``folder/data/<config>/``: per config and Hugging Face split, the
    files written (relative to ``folder``; an empty split has none and is left out)."""
    files: dict[str, dict[str, list[str]]] = {}
    for variant, by_split in rows_by_variant.items():
        files[variant] = {}
        for split, rows in by_split.items():
            hf_split = HF_SPLITS[split]
            paths = write_shards(rows, schema, folder / "data" / variant, hf_split, max_bytes, workdir, embed)
            if paths:
                files[variant][hf_split] = [p.relative_to(folder).as_posix() for p in paths]
    return files


def write_shards(
    rows: list[dict[str, Any]],
    schema: pa.Schema,
    folder: Path,
    split: str,
    max_bytes: int,
    workdir: Path,
    embed: bool,
) -> list[Path]:
    """``<split>-NNNNN-of-NNNNN.parquet`` shards of at most ``max_bytes`` uncompressed each.

    Rows are grouped greedily in ``clip_id`` order (a row larger than the bound gets its own
    shard); media is read shard by shard, so memory holds one shard's media at most.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    groups: list[list[dict[str, Any]]] = []
    size = 0
    for row in rows:
        n = _row_bytes(row, workdir, embed)
        if not groups or (groups[-1] and size + n > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(row)
        size += n
    # An empty split is left out: datasets cannot read a 0-row shard.
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, group in enumerate(groups):
        if embed:
            group = [_with_media(row, workdir) for row in group]
        table = pa.Table.from_pylist(group, schema=schema)
        path = folder / f"{split}-{i:05d}-of-{len(groups):05d}.parquet"
        # Parquet keeps no write time; created_by names the pyarrow version only.
        pq.write_table(table, path, compression="zstd", row_group_size=10_000)
        paths.append(path)
    return paths


def write_documents(
    folder: Path,
    statistics: dict[str, Any],
    cfg: ExportConfig,
    audiocaps_license: Path,
    exported: list[dict[str, Any]],
    merged_splits: set[str],
) -> None:
    """``statistics.json``, ``LICENSE``, the figures (``export.figures``) and the card, validated
    (``exported``: every exported clip once, for the figures)."""
    atomic_write_text(folder / "statistics.json", json.dumps(statistics, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / "LICENSE", license_text(audiocaps_license))
    figures = []
    if cfg.figures:
        from stages.export.figures import write_figures

        figures = write_figures(folder, exported, merged_splits, statistics)
    atomic_write_text(folder / "README.md", render_card(statistics, cfg, figures))
    validate_card(folder / "README.md", folder)


def write_checksums(folder: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{file_digest(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    dest = folder / "SHA256SUMS"
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def swap_in(new: Path, dest: Path) -> None:
    """Replace ``dest`` by ``new`` (both folders): rename old away, rename new in, remove old."""
    old = dest.with_name(f".tmp-old-{uuid.uuid4().hex[:8]}-{dest.name}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def license_text(audiocaps_license: Path) -> str:
    head = (
        "AudioVisualCaps export: terms\n"
        "=============================\n\n"
        "The audio captions are the AudioCaps captions: free to use for academic purposes only.\n"
        "The AudioCaps repository (CSV files) is distributed under the licence below. The visual and\n"
        "merged captions were generated by models (see the card) from YouTube content that is not\n"
        "part of this dataset; media embedded in a private copy remains the property of its owners.\n\n"
    )
    body = audiocaps_license.read_text(encoding="utf-8") if audiocaps_license.exists() else ""
    return head + ("AudioCaps licence\n-----------------\n\n" + body if body else "")
