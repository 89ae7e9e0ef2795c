"""Where stage 1 stores a clip: ``media/video/<2 hex of blake2b(clip_id)>/<clip_id>.<ext>``.

256 folders, so finding or placing a clip never lists a folder; the ledger's ``video_path`` says
where each one is (old run folders keep their flat ``media/video/<clip_id>.<ext>`` rows and files).
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def video_path(media_dir: Path, clip_id: str, suffix: str = ".mp4") -> Path:
    """Where a clip is stored: ``video/<2 hex of blake2b(clip_id)>/<clip_id><suffix>``, 256
    folders, so a million clips make folders of ~4,000 files and no folder is ever listed."""
    bucket = hashlib.blake2b(clip_id.encode(), digest_size=1).hexdigest()
    return media_dir / "video" / bucket / f"{clip_id}{suffix}"


VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".m4v")


def existing_videos(media_dir: Path, clip_id: str) -> list[Path]:
    """Files of ``clip_id`` already in place (left by a run killed before its commit): a few
    ``stat`` calls, in the hashed layout and in the flat one of older run folders, never a listing."""
    candidates = [video_path(media_dir, clip_id, sfx) for sfx in VIDEO_SUFFIXES]
    candidates += [media_dir / "video" / f"{clip_id}{sfx}" for sfx in VIDEO_SUFFIXES]
    return [p for p in candidates if p.is_file()]
