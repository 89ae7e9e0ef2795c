"""The paper's modality-robustness conditions, as input sets any model can read.

For each clip (one image, one audio track) :func:`perturb` writes, per condition, a manifest
``OUT/<condition>/manifest.csv`` with the columns ``clip_id,image,audio,image_source,audio_source``
(absolute paths; the ``*_source`` columns say where each stream comes from: a clip id, or the
name of the replacement). The conditions:

==================  ======================================================================
clean               both streams as they are
visual_black        an all-black RGB image of the same size (PNG, lossless)
visual_white        an all-white RGB image of the same size
visual_noise        uniform random RGB pixels 0..255 of the same size
audio_silent        zeros, same number of samples, channels and rate (16-bit PCM WAV)
audio_gaussian      N(0, noise_std^2) samples (full scale is 1.0), same length and rate
visual_shuffled     every clip gets another clip's image: a seeded derangement (nobody keeps
                    its own, every image used exactly once)
audio_shuffled      the same for the audio, with its own derangement
==================  ======================================================================

Everything is deterministic given the seed: the noise of a clip depends only on the seed and its
clip id (not on the order or the set of clips), a derangement only on the seed and the sorted set
of clip ids. Files are written atomically and kept on a rerun, so an interrupted run resumes.
Unreadable sources are skipped, named in ``OUT/perturb.json``, and take part in no condition.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path, atomic_write_text

CONDITIONS = (
    "clean",
    "visual_black",
    "visual_white",
    "visual_noise",
    "audio_silent",
    "audio_gaussian",
    "visual_shuffled",
    "audio_shuffled",
)
MANIFEST_COLUMNS = ("clip_id", "image", "audio", "image_source", "audio_source")


@dataclass(frozen=True)
class Source:
    clip_id: str
    image: Path
    audio: Path


def derangement(n: int, seed: int | list[int]) -> list[int]:
    """A uniformly random permutation of ``range(n)`` with no fixed point (rejection sampling:
    about e tries on average), seeded."""
    import numpy as np

    if n < 2:
        raise AbortRun(f"shuffling needs at least 2 clips, got {n}")
    rng = np.random.default_rng(seed)
    identity = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not (perm == identity).any():
            return [int(i) for i in perm]


def clip_rng(seed: int, stream: int, clip_id: str) -> Any:
    """The random generator of one clip's noise: depends on the seed, the stream and the id only."""
    import numpy as np

    key = int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, stream, key])


def read_run_sources(run_dir: Path, split: str | None = "test") -> dict[str, Source]:
    """clip_id -> Source from a run folder: the middle keyframe and the audio track of every clip
    with an ok ``02-keyframes`` row (of ``split`` when the manifest ledger says which)."""
    from pipeline.ledger import Ledger

    ledger = Ledger(run_dir / "02-keyframes" / "ledger")
    if not ledger.exists():
        raise AbortRun(f"{run_dir}: no 02-keyframes ledger; run the keyframes stage first")
    df = ledger.latest()
    df = df[df["status"] == "ok"]
    if split:
        manifest = Ledger(run_dir / "00-manifest" / "ledger")
        if manifest.exists():
            m = manifest.latest()
            keep = set(m.index[m["split"] == split])
            df = df[df.index.isin(keep)]
    out: dict[str, Source] = {}
    for clip_id, row in df.iterrows():
        frames = list(row["frame_paths"])
        idx = int(row["middle_frame"])
        if not frames or not 0 <= idx < len(frames):
            raise AbortRun(
                f"{run_dir}: clip {clip_id} has middle_frame {idx} outside its {len(frames)} frames"
            )
        out[str(clip_id)] = Source(str(clip_id), run_dir / frames[idx], run_dir / row["audio_path"])
    if not out:
        raise AbortRun(f"{run_dir}: no clip with ok keyframes" + (f" in split {split!r}" if split else ""))
    return out


def read_export_sources(
    export: Path, media_dir: Path, split: str = "test", config_name: str | None = None
) -> dict[str, Source]:
    """clip_id -> Source from an export folder (or a run folder holding ``export/``): its
    ``frame_path`` / ``audio_path`` columns (relative to the run folder), or, when the export
    embeds its media (``image`` / ``audio`` columns with bytes), those bytes, written once to
    ``media_dir``. Every config holds the same clips of a split; the first one (or
    ``config_name``) is read."""
    import pyarrow.parquet as pq

    from evalkit.data import find_export_files

    base = export / "export" if (export / "export" / "data").is_dir() else export
    run_dir = base.parent
    files = next(iter(find_export_files(export, split, config_name).values()))
    out: dict[str, Source] = {}
    for f in files:
        names = pq.read_schema(f).names
        embedded = {"image", "audio"} <= set(names)
        needed = ["clip_id"] + (["image", "audio"] if embedded else ["frame_path", "audio_path"])
        if not set(needed) <= set(names):
            raise AbortRun(f"{f}: needs columns {needed} (an export of AudioVisualCaps)")
        for row in pq.read_table(f, columns=needed).to_pylist():
            cid = row["clip_id"]
            if not embedded:
                if not row["frame_path"] or not row["audio_path"]:
                    raise AbortRun(f"{f}: clip {cid} has no frame_path / audio_path")
                out[cid] = Source(cid, run_dir / row["frame_path"], run_dir / row["audio_path"])
                continue
            paths = []
            for column in ("image", "audio"):
                media = row[column] or {}
                if not media.get("bytes"):
                    raise AbortRun(f"{f}: clip {cid} has no embedded {column}")
                dest = media_dir / column / f"{cid}{Path(media.get('path') or '').suffix}"
                if not dest.exists():
                    with atomic_path(dest) as tmp:
                        tmp.write_bytes(media["bytes"])
                paths.append(dest)
            out[cid] = Source(cid, paths[0], paths[1])
    if not out:
        raise AbortRun(f"{export}: no clips in split {split!r}")
    return out


def read_manifest_sources(path: Path) -> dict[str, Source]:
    """clip_id -> Source from a CSV or JSONL with ``clip_id,image,audio`` (paths relative to the
    manifest's folder or absolute)."""
    if not path.is_file():
        raise AbortRun(f"manifest not found: {path}")
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            rows = [(f"{path}:{n}", r) for n, r in enumerate(csv.DictReader(fh), start=2)]
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise AbortRun(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    else:
        raise AbortRun(f"{path}: manifest must be .csv or .jsonl")
    out: dict[str, Source] = {}
    for where, r in rows:
        if not isinstance(r, dict) or not all(r.get(k) for k in ("clip_id", "image", "audio")):
            raise AbortRun(f"{where}: needs clip_id, image and audio")
        cid = str(r["clip_id"])
        if cid in out:
            raise AbortRun(f"{where}: clip {cid} listed twice")
        out[cid] = Source(cid, path.parent / r["image"], path.parent / r["audio"])
    if not out:
        raise AbortRun(f"{path}: no clips")
    return out


def _probe(src: Source) -> tuple[tuple[int, int], Any]:
    """(image size, soundfile info) of a clip's sources; raises ValueError naming what is wrong."""
    import soundfile as sf
    from PIL import Image

    try:
        with Image.open(src.image) as im:
            im.verify()
            size = im.size
    except Exception as exc:  # PIL raises many types for a bad image
        raise ValueError(f"image {src.image}: {type(exc).__name__}: {exc}") from None
    try:
        info = sf.info(str(src.audio))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError
        raise ValueError(f"audio {src.audio}: {type(exc).__name__}: {exc}") from None
    if info.frames <= 0:
        raise ValueError(f"audio {src.audio}: no samples")
    return size, info


def _write_png(dest: Path, array: Any) -> None:
    from PIL import Image

    if dest.exists():
        return
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG")
    with atomic_path(dest) as tmp:
        tmp.write_bytes(buf.getvalue())


def _write_wav(dest: Path, samples: Any, rate: int) -> None:
    import soundfile as sf

    if dest.exists():
        return
    with atomic_path(dest) as tmp:
        # 16-bit PCM: what every audio loader reads, and byte-for-byte reproducible (libsndfile
        # stamps float WAVs with the time of writing in a PEAK chunk).
        sf.write(str(tmp), samples, rate, subtype="PCM_16", format="WAV")


def _image_for(condition: str, size: tuple[int, int], seed: int, clip_id: str) -> Any:
    import numpy as np

    w, h = size
    if condition == "visual_black":
        return np.zeros((h, w, 3), dtype=np.uint8)
    if condition == "visual_white":
        return np.full((h, w, 3), 255, dtype=np.uint8)
    return clip_rng(seed, 0, clip_id).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _audio_for(condition: str, info: Any, seed: int, noise_std: float, clip_id: str) -> Any:
    import numpy as np

    shape = (info.frames,) if info.channels == 1 else (info.frames, info.channels)
    if condition == "audio_silent":
        return np.zeros(shape, dtype=np.float32)
    noise = clip_rng(seed, 1, clip_id).normal(0.0, noise_std, size=shape)
    # Full scale is [-1, 1]; at the usual levels (std <= 0.3) clipping touches < 1e-3 of samples.
    return np.clip(noise, -1.0, 1.0).astype(np.float32)


def _settings(seed: int, noise_std: float) -> dict[str, Any]:
    return {"seed": seed, "noise_std": noise_std}


def perturb(
    sources: Mapping[str, Source],
    out: Path,
    seed: int = 0,
    noise_std: float = 0.1,
    conditions: tuple[str, ...] = CONDITIONS,
) -> dict[str, Any]:
    """Write every condition's media and manifest under ``out``; returns the summary also written
    to ``out/perturb.json``."""
    if noise_std <= 0:
        raise AbortRun(f"noise_std must be > 0, got {noise_std}")
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise AbortRun(f"unknown conditions {unknown}; valid: {', '.join(CONDITIONS)}")
    meta_path = out / "perturb.json"
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous.get("settings") != _settings(seed, noise_std):
            raise AbortRun(
                f"{out} holds perturbations made with {previous.get('settings')}; "
                f"use another --out for {_settings(seed, noise_std)}"
            )
    probes: dict[str, tuple[tuple[int, int], Any]] = {}
    skipped: dict[str, str] = {}
    for cid in sorted(sources):
        try:
            probes[cid] = _probe(sources[cid])
        except ValueError as exc:
            skipped[cid] = str(exc)
    ids = sorted(probes)
    if not ids:
        raise AbortRun(f"no readable clip among {len(sources)}: e.g. {next(iter(skipped.values()), '')}")
    # Only the shuffled conditions asked for get a derangement.
    shuffles = {
        cond: derangement(len(ids), [seed, salt])
        for cond, salt in (("visual_shuffled", 10), ("audio_shuffled", 11))
        if cond in conditions
    }
    for cond in conditions:
        rows = []
        for i, cid in enumerate(ids):
            src = sources[cid]
            size, info = probes[cid]
            image, audio = src.image.resolve(), src.audio.resolve()
            image_source = audio_source = cid
            if cond in ("visual_black", "visual_white", "visual_noise"):
                image = (out / cond / "image" / f"{cid}.png").resolve()
                _write_png(image, _image_for(cond, size, seed, cid))
                image_source = cond.removeprefix("visual_")
            elif cond in ("audio_silent", "audio_gaussian"):
                audio = (out / cond / "audio" / f"{cid}.wav").resolve()
                _write_wav(audio, _audio_for(cond, info, seed, noise_std, cid), info.samplerate)
                audio_source = cond.removeprefix("audio_")
            elif cond == "visual_shuffled":
                image_source = ids[shuffles[cond][i]]
                image = sources[image_source].image.resolve()
            elif cond == "audio_shuffled":
                audio_source = ids[shuffles[cond][i]]
                audio = sources[audio_source].audio.resolve()
            rows.append([cid, str(image), str(audio), image_source, audio_source])
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
        atomic_write_text(out / cond / "manifest.csv", buf.getvalue())
    summary = {
        "settings": _settings(seed, noise_std),
        "conditions": list(conditions),
        "clips": len(ids),
        "skipped": skipped,
        "manifests": {c: str((out / c / "manifest.csv").resolve()) for c in conditions},
    }
    atomic_write_text(meta_path, json.dumps(summary, indent=2) + "\n")
    return summary


def read_condition_manifest(path: Path) -> list[dict[str, str]]:
    """The rows of a condition manifest written by :func:`perturb`."""
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
