"""Stage 1's media checks with PyAV: decode a downloaded file whole, probe a source's duration.

yt-dlp can report success on an empty, stream-less or truncated file, so a file counts only once
:func:`decode_media` has decoded every frame and sample of it.
"""

from __future__ import annotations

import io
import time
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PermanentError, TransientError

if TYPE_CHECKING:
    import av.container


def open_media(media: Path | bytes) -> av.container.InputContainer:
    """PyAV's container for reading a file or media bytes held in memory."""
    import av

    return av.open(io.BytesIO(media) if isinstance(media, bytes) else str(media), "r")


def seconds(pts: int | None, time_base: Fraction | None) -> float:
    """A timestamp in seconds (0 when the stream gives none: no start time, no time base)."""
    return float(pts * time_base) if pts is not None and time_base is not None else 0.0


def decode_media(path: Path | bytes, name: str | None = None) -> dict[str, Any]:
    """Decode every frame and audio sample of ``path`` (a file, or media bytes held in memory:
    a tar member, a dataset cell) with PyAV; return what was found. ``name`` names it in errors.

    A truncated or corrupt file raises or comes out short here, whatever its header claims.
    """
    import av

    name = name or (path.name if isinstance(path, Path) else "media")
    found: dict[str, Any] = {"video_end_s": 0.0, "audio_end_s": 0.0, "has_audio": False}
    with open_media(path) as container:
        if not container.streams.video:
            raise PermanentError("no_video", f"{name}: no video stream")
        vs = container.streams.video[0]
        found.update(width=vs.codec_context.width, height=vs.codec_context.height)
        streams: list[Any] = [vs]
        if container.streams.audio:
            found["has_audio"] = True
            streams.append(container.streams.audio[0])
        n_video = 0
        for frame in container.decode(*streams):
            if frame.pts is None:
                continue
            start = seconds(frame.pts, frame.time_base)
            if isinstance(frame, av.AudioFrame):
                found["audio_end_s"] = max(found["audio_end_s"], start + frame.samples / frame.sample_rate)
            else:
                n_video += 1
                rate = float(vs.average_rate or 25)
                found["video_end_s"] = max(found["video_end_s"], start + 1.0 / rate)
        found["video_end_s"] -= seconds(vs.start_time, vs.time_base)
        found["frames"] = n_video
    if n_video == 0:
        raise PermanentError("corrupt_download", f"{name}: no decodable video frame")
    return found


def decode_audio(media: Path | bytes, name: str) -> dict[str, Any]:
    """Decode every sample of the first audio stream of ``media`` (an audio-only source's file:
    wav, flac, m4a...); ``audio_end_s`` is where its sound ends. A file without audio raises."""
    end = 0.0
    with open_media(media) as container:
        if not container.streams.audio:
            raise PermanentError("no_audio", f"{name}: no audio stream")
        stream = container.streams.audio[0]
        first = seconds(stream.start_time, stream.time_base)
        for frame in container.decode(stream):
            if frame.pts is not None:
                end = max(end, seconds(frame.pts, frame.time_base) + frame.samples / frame.sample_rate)
    return {"audio_end_s": end - first, "has_audio": True}


def media_duration(media: Path | bytes) -> tuple[float | None, bool, bool]:
    """A container's duration (s, None when unknown) and whether it has video and audio streams,
    from its header (a full-length source is not decoded whole: the cut decodes what it needs)."""
    with open_media(media) as c:
        duration = float(c.duration / 1e6) if c.duration else None
        return duration, bool(c.streams.video), bool(c.streams.audio)


def probe_source(url: str, timeout_s: float) -> float | None:
    """The duration of a direct media URL (seconds), or raise the classified probe failure.

    Used when yt-dlp's info has no duration (direct files), and to tell why ffmpeg failed (yt-dlp
    runs it quietly and only says "ffmpeg exited with code 1").
    """
    import av

    t0 = time.monotonic()
    try:
        with av.open(url, timeout=(timeout_s, timeout_s)) as c:
            return float(c.duration / 1e6) if c.duration else None
    except av.error.FFmpegError as exc:
        if time.monotonic() - t0 >= 0.9 * timeout_s:
            # A read that timed out: demuxers report it as whatever they were parsing
            # ("Invalid data found" for mp4), so the clock tells a stall from bad bytes.
            raise TransientError("timeout", f"source probe timed out after {timeout_s:g} s: {exc}") from exc
        if isinstance(exc, av.error.HTTPNotFoundError):
            raise PermanentError("http_404", f"source probe: {exc}") from exc
        if isinstance(exc, (av.error.HTTPForbiddenError, av.error.HTTPServerError)):
            raise TransientError("http_error", f"source probe: {exc}") from exc
        if isinstance(exc, av.error.HTTPClientError):
            raise PermanentError("http_4xx", f"source probe: {exc}") from exc
        if isinstance(exc, av.error.InvalidDataError):
            raise PermanentError("corrupt_source", f"source probe: {exc}") from exc
        raise TransientError("source_probe", f"source probe: {exc}") from exc
