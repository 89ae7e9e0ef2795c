"""Stand-ins for the evaluation kit's tests: prediction / reference files from the real AudioCaps
test captions, and small media sets (frames, audio) for the robustness kit."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from stages.manifest import clip_id_for

REPO = Path(__file__).resolve().parents[1]
AUDIOCAPS_TEST = REPO / "manifests" / "audiocaps" / "test.csv"


def audiocaps_test_captions(path: Path = AUDIOCAPS_TEST) -> dict[str, list[str]]:
    """clip_id -> the five AudioCaps test captions, in file order."""
    out: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(clip_id_for(row["youtube_id"], int(row["start_time"])), []).append(row["caption"])
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_predictions(path: Path, preds: dict[str, str]) -> Path:
    return write_jsonl(path, [{"clip_id": c, "caption": t} for c, t in preds.items()])


# (image width, height), audio rate, samples, channels, container
MEDIA_SPECS = [
    ((224, 224), 16000, 160000, 1, "flac"),
    ((320, 240), 16000, 159000, 1, "flac"),
    ((640, 360), 44100, 441000, 2, "wav"),
    ((100, 80), 22050, 1234, 1, "wav"),
    ((224, 224), 16000, 160000, 1, "flac"),
    ((17, 31), 8000, 8000, 2, "flac"),
    ((224, 224), 48000, 480000, 1, "wav"),
]


def make_media(root: Path, seed: int = 7) -> Path:
    """JPEG frames and FLAC / WAV audio for ``len(MEDIA_SPECS)`` clips, of different sizes,
    lengths, rates and channel counts, and ``root/manifest.csv`` (clip_id,image,audio)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (size, rate, frames, channels, ext) in enumerate(MEDIA_SPECS):
        cid = f"clip{i:02d}_{i * 1000}_{i * 1000 + 10000}"
        img = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"{cid}.jpg", quality=90)
        shape = (frames,) if channels == 1 else (frames, channels)
        sf.write(root / f"{cid}.{ext}", (0.3 * rng.standard_normal(shape)).clip(-1, 1), rate)
        rows.append({"clip_id": cid, "image": f"{cid}.jpg", "audio": f"{cid}.{ext}"})
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["clip_id", "image", "audio"])
        w.writeheader()
        w.writerows(rows)
    return root / "manifest.csv"
