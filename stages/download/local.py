"""Take a clip from a local source: find it in the source's index, read it, check it by decoding,
and place it in ``media/video/`` as stage 1 places a download.

- A pre-cut clip is decoded whole (as a download is), then linked or copied as it is (a folder's
  file; ``place``) or written (a tar member read by offset, a dataset cell).
- A full-length video is cut here to [start, start + 10 s) into the format of a download
  (:mod:`stages.download.cut`); so is a pre-cut clip that takes its sound from another source.
- An audio-only source's file is decoded whole (pre-cut) or checked to reach the clip (full-length).

Every failure is an :class:`~pipeline.errors.ItemError` naming the file, member or row, and fails
only this source's try: the stage goes on to the next source. Errors of the machine (a full disk)
are not caught here: they reach the engine, which stops the run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ItemError, PermanentError
from pipeline.io import atomic_path, file_digest
from pipeline.machine import machine_cause
from stages.download.cut import Encoding, Input, cut
from stages.download.index import SourceIndex, inside
from stages.download.media import decode_audio, decode_media, media_duration
from stages.download.sources import clip_keys

if TYPE_CHECKING:
    from pipeline.stage import Item


def _machine(exc: BaseException) -> bool:
    """An error of the machine (a full disk, no file handles...), never a clip's failure: the
    engine stops the run on it (:mod:`pipeline.machine`)."""
    return machine_cause(exc) is not None


@dataclass
class Taken:
    """One stream's candidate from one source, read and checked."""

    label: str  # kind:name of the source
    ref: str  # the file's absolute path, ``shard:member``, ``dataset row N``, or the URL
    media: Path | bytes
    precut: bool
    start_s: float  # where the clip starts in this media (0 for a pre-cut clip)
    expected_s: float  # how long the clip is in it (10 s, or less when the source ends early)
    info: dict[str, Any] = field(default_factory=dict)  # decode_media's (pre-cut video), has_audio ...
    source_duration_s: float | None = None
    link_from: Path | None = None  # a folder's file, which may be linked or copied as it is
    place: str = "copy"
    suffix: str = ".mp4"
    url: str | None = None  # a YouTube download's URL

    @property
    def has_audio(self) -> bool:
        return bool(self.info.get("has_audio"))

    def digest(self) -> str:
        if isinstance(self.media, bytes):
            return "sha256:" + hashlib.sha256(self.media).hexdigest()
        return "sha256:" + file_digest(self.media)


def _corrupt(ref: str, exc: BaseException) -> PermanentError:
    return PermanentError("corrupt_source", f"{ref}: cannot decode: {type(exc).__name__}: {exc}")


class LocalMedia:
    """The local sources' indexes and the settings to take clips from them with."""

    def __init__(self, indexes: dict[str, SourceIndex], cfg: Any, suffixes: tuple[str, ...]) -> None:
        self.indexes, self.cfg, self.suffixes = indexes, cfg, suffixes
        self.enc = Encoding(cfg.max_height, cfg.keyframe_interval_s, cfg.encode_preset)

    # -- finding and reading ----------------------------------------------------------------------
    def find(self, label: str, item: Item) -> tuple[SourceIndex, dict[str, Any]] | None:
        """The one entry of source ``label`` holding the clip, or None. Several entries claiming it
        are ``ambiguous_source`` (never a silent pick); only refused ones are ``unsafe_source``."""
        index = self.indexes[label]
        rows = index.rows(clip_keys(index.pattern.holds, item.data, item.clip_id))
        if not rows:
            return None
        usable = [r for r in rows if not r["refused"]]
        if len(usable) > 1:
            names = ", ".join(self._where(index, r) for r in usable)
            raise PermanentError(
                "ambiguous_source",
                f"{label} holds {len(usable)} files for clip {item.clip_id}: {names}; keep one (or make "
                "the pattern tell them apart), then rerun with --retry-failed",
            )
        if not usable:
            r = rows[0]
            raise PermanentError("unsafe_source", f"{label}: {self._where(index, r)} refused: {r['refused']}")
        return index, usable[0]

    def _where(self, index: SourceIndex, row: dict[str, Any]) -> str:
        src = index.src
        if src.kind == "folder":
            return str(Path(src.path).absolute() / row["name"])
        if src.kind == "tar":
            return f"{index.shard(row['shard'])}:{row['name']}"
        return f"{src.dataset} {row['name']}"

    def read(self, index: SourceIndex, row: dict[str, Any]) -> tuple[Path | bytes, str]:
        """The entry's media (a file, or bytes read by offset or from a dataset cell) and its ref."""
        src, ref = index.src, self._where(index, row)
        if src.kind == "folder":
            path = Path(src.path) / row["name"]
            real = os.path.realpath(path)
            if not inside(real, os.path.realpath(src.path)):  # the link was changed since indexing
                raise PermanentError(
                    "unsafe_source", f"{ref} refused: a symbolic link to {real}, outside its root"
                )
            if not os.path.isfile(real):
                raise PermanentError("corrupt_source", f"{ref}: gone since the source was indexed")
            return Path(real), ref
        if src.kind == "tar":
            with open(index.shard(row["shard"]), "rb") as fh:
                fh.seek(row["offset"])
                data = fh.read(row["size"])
            if len(data) != row["size"]:
                raise PermanentError(
                    "corrupt_source", f"{ref}: {len(data)} of {row['size']} bytes in the shard"
                )
            return data, ref
        cell = index.ds.data.table.column(src.media_column)[row["offset"]].as_py()
        return self._cell(index, cell, ref), ref

    @staticmethod
    def _cell(index: SourceIndex, cell: Any, ref: str) -> Path | bytes:
        """A dataset cell: bytes, a path, or ``{bytes, path}`` (datasets' Video/Audio storage)."""
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, bytes) and cell:
            return cell
        if isinstance(cell, str) and cell:
            path = Path(cell)
            if not path.is_absolute() and Path(index.src.dataset).is_dir():
                path = Path(index.src.dataset) / path
            if path.is_file():
                return path
            raise PermanentError("corrupt_source", f"{ref}: the file it names, {cell}, does not exist")
        raise PermanentError("corrupt_source", f"{ref}: no media in column {index.src.media_column!r}")

    # -- checking ---------------------------------------------------------------------------------
    def video(self, label: str, item: Item) -> Taken | None:
        """The clip's picture from source ``label``, checked; None when the source lacks it."""
        found = self.find(label, item)
        if found is None:
            return None
        index, row = found
        media, ref = self.read(index, row)
        length = float(item["end_s"]) - float(item["start_s"])
        src = index.src
        taken = Taken(
            label, ref, media, index.pattern.precut, 0.0, length, place=getattr(src, "place", "copy")
        )
        if src.kind == "folder":
            taken.link_from = media if isinstance(media, Path) else None
        suffix = Path(row["name"]).suffix.lower() if src.kind != "hf" else ""
        taken.suffix = suffix if suffix in self.suffixes else ".mp4"
        self.examine(taken, item, media, ref, "video")
        return taken

    def audio(self, label: str, item: Item) -> Taken | None:
        """The clip's sound from an audio-only source ``label``, checked; None when it lacks it."""
        found = self.find(label, item)
        if found is None:
            return None
        index, row = found
        media, ref = self.read(index, row)
        length = float(item["end_s"]) - float(item["start_s"])
        taken = Taken(label, ref, media, index.pattern.precut, 0.0, length)
        self.examine(taken, item, media, ref, "audio")
        return taken

    def examine(self, taken: Taken, item: Item, media: Path | bytes, ref: str, stream: str) -> None:
        """Check ``taken``'s ``stream`` ("video" or "audio"): a pre-cut clip decoded whole and its
        length checked, a full-length file probed and its cut placed; damage is ``corrupt_source``."""
        try:
            if taken.precut:
                taken.info = (decode_media if stream == "video" else decode_audio)(media, ref)
                self.check_length(taken, taken.info[f"{stream}_end_s"], stream)
            else:
                duration, has_video, has_audio = media_duration(media)
                if not (has_video if stream == "video" else has_audio):
                    raise PermanentError(f"no_{stream}", f"{ref}: no {stream} stream")
                self.cut_range(taken, item, duration)
                taken.info = {"has_audio": has_audio}
        except ItemError:
            raise
        except Exception as exc:
            if _machine(exc):
                raise
            raise _corrupt(ref, exc) from exc

    def check_length(self, taken: Taken, decoded_s: float, what: str) -> None:
        """A pre-cut clip must hold the whole clip: a shorter one is truncated (or cut wrong)."""
        if decoded_s < taken.expected_s - self.cfg.duration_tolerance_s:
            raise PermanentError(
                "corrupt_source",
                f"{taken.ref}: {decoded_s:.2f} s of {what} decoded, {taken.expected_s:.2f} s expected "
                "(truncated?)",
            )

    @staticmethod
    def cut_range(taken: Taken, item: Item, duration: float | None) -> None:
        """Where a full-length file holds the clip; ``too_short`` when it ends before it starts."""
        start = float(item["start_s"])
        if duration is not None and duration <= start:
            raise PermanentError(
                "too_short", f"{taken.ref}: ends at {duration:.2f} s, before the clip starts ({start:g} s)"
            )
        taken.start_s = start
        taken.source_duration_s = duration
        if duration is not None:
            taken.expected_s = min(taken.expected_s, duration - start)

    # -- placing ----------------------------------------------------------------------------------
    def build(
        self, dest_for: Any, tmp_dir: Path, video: Taken, audio: Taken | None
    ) -> tuple[Path, dict[str, Any]]:
        """Place the clip: as it is (a pre-cut clip with its own sound), or cut/rebuilt with the
        sound of ``audio``. Returns the placed file and what decoding it found."""
        if video.precut and audio is None:
            dest = dest_for(video.suffix)
            with atomic_path(dest, tmp_dir) as tmp:
                self._place(video, tmp)
            return dest, video.info
        dest = dest_for(".mp4")
        with atomic_path(dest, tmp_dir) as tmp:
            try:
                cut(
                    Input(video.media, video.start_s),
                    video.expected_s,
                    tmp,
                    self.enc,
                    Input(audio.media, audio.start_s) if audio is not None else None,
                )
                info = decode_media(tmp, video.ref)
            except ItemError:
                raise
            except Exception as exc:
                if _machine(exc):
                    raise
                culprit = video.ref if audio is None else f"{video.ref} with the sound of {audio.ref}"
                raise _corrupt(culprit, exc) from exc
            want = min(video.expected_s, audio.expected_s) if audio is not None else video.expected_s
            if info["video_end_s"] < want - self.cfg.duration_tolerance_s:
                raise PermanentError(
                    "corrupt_source",
                    f"{video.ref}: the cut holds {info['video_end_s']:.2f} s of video, {want:.2f} s expected "
                    "(the source is damaged there?)",
                )
        return dest, info

    @staticmethod
    def _place(video: Taken, tmp: Path) -> None:
        if isinstance(video.media, bytes):
            tmp.write_bytes(video.media)
        elif video.url is not None:  # a YouTube download in the temp folder: moved
            os.replace(video.media, tmp)
        elif video.link_from is not None and video.place == "link":
            try:
                os.link(video.link_from, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                os.symlink(video.link_from, tmp)  # another filesystem: a symbolic link
        else:
            shutil.copyfile(video.media, tmp)
