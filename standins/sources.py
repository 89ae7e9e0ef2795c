"""Local media sources as labs hold them, generated for tests, the demo and the benchmarks: a
folder tree, WebDataset-style tar shards, a Hugging Face dataset saved with ``datasets``, and
audio-only files. They are real files of those formats (the stage reads them as it would a lab's);
only their content is generated (:func:`standins.media.make_clip`).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def make_wav(dest: Path, seconds: float, tone_hz: float = 660.0, rate: int = 16000) -> Path:
    """A mono 16-bit WAV of a sine tone (an AudioCaps audio mirror's file)."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    dest.parent.mkdir(parents=True, exist_ok=True)
    sf.write(dest, (0.4 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32), rate, subtype="PCM_16")
    return dest


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """An uncompressed tar shard holding ``members`` (name, bytes) in order, names as given (an
    absolute or climbing name included: what a badly made shard holds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return path


def write_hf_dataset(folder: Path, columns: dict[str, list[object]]) -> Path:
    """A dataset written by ``datasets`` (``save_to_disk``), as a lab keeps a Hub mirror."""
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(folder))
    return folder
