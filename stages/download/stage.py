"""Stage 1: download each clip's 10-s section with yt-dlp, and validate it by decoding.

yt-dlp runs through its Python API on a URL made from ``download.url_template`` (YouTube by
default; tests and the demo point it at 127.0.0.1). Only the clip's section is fetched
(``download_ranges``), cut exactly (``force_keyframes_at_cuts``: ffmpeg re-encodes the section)
and capped in height. Nothing can hang: yt-dlp has a socket timeout, ffmpeg a read timeout
(``-rw_timeout``), and the source probe an open/read timeout.

yt-dlp can report success on an empty, stream-less or truncated file, so every file is decoded
with PyAV before it counts (:mod:`stages.download.media`: both streams present, duration within
tolerance of 10 s or of the source's end). Failures are classified
(:mod:`stages.download.failures`) into permanent reasons (``private``, ``removed``,
``copyright``, ``http_404``...) that are never retried, and transient ones (``http_429``,
``bot_check``, ``timeout``...) that the runner retries with backoff.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.errors import AbortRun, ItemError, PermanentError, TransientError
from pipeline.io import atomic_path, temp_name
from pipeline.selection import eligible_frame
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.download.failures import classify
from stages.download.media import decode_media, probe_source

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


class DownloadConfig(StageConfig):
    batch_size: int = Field(8, gt=0, description="Clips per process() call (and per ledger commit).")
    max_attempts: int = Field(4, gt=0, description="Attempts for a clip failing transiently.")
    backoff_s: float = Field(30.0, ge=0, description="First retry delay; doubles per attempt.")
    url_template: str = Field(
        "https://www.youtube.com/watch?v={id}", description="Source URL; {id} is the YouTube id."
    )
    max_height: int = Field(360, gt=0, description="Video height cap (BLIP-2 sees 224-384 px).")
    concurrency: int = Field(2, gt=0, description="Clips downloaded at once (threads) in a batch.")
    delay_s: float = Field(
        0.0, ge=0, description="Politeness: least seconds between two download starts, run-wide."
    )
    jitter_s: float = Field(0.0, ge=0, description="Random extra delay (0..jitter_s) per start.")
    rate_limit: int | None = Field(None, gt=0, description="yt-dlp byte rate limit per download (B/s).")
    cookies_file: Path | None = Field(None, description="Netscape cookies file (YouTube bot checks).")
    proxy: str | None = Field(None, description="Proxy URL for yt-dlp and ffmpeg.")
    socket_timeout_s: float = Field(20.0, gt=0, description="yt-dlp socket timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="ffmpeg -rw_timeout: a stalled read fails.")
    retries: int = Field(1, ge=0, description="yt-dlp's own retries inside one attempt.")
    encode_preset: str = Field("ultrafast", description="x264 preset of the exact-cut re-encode.")
    keyframe_interval_s: float = Field(
        1.0, gt=0, description="A keyframe every this many seconds in the cut clip (stage 2 seeks to them)."
    )
    duration_tolerance_s: float = Field(0.6, ge=0, description="Allowed shortfall of the clip duration.")
    require_audio: bool = Field(True, description="A clip without an audio stream fails (no_audio).")
    reuse_existing: bool = Field(
        True, description="Keep a valid file already in place (left by a run killed before its commit)."
    )


def _private_copy(path: Path) -> Path:
    """A copy of ``path`` readable only by this user, in the system temp folder (not the run
    folder: cookies are secrets)."""
    import shutil
    import tempfile

    fd, name = tempfile.mkstemp(prefix="avcaps-cookies-", suffix=".txt")
    os.close(fd)  # mkstemp made it 0600
    shutil.copyfile(path, name)
    return Path(name)


class _Politeness:
    """Run-wide least gap between download starts (shared by the threads of a stage)."""

    def __init__(self, delay_s: float, jitter_s: float) -> None:
        self.delay_s, self.jitter_s = delay_s, jitter_s
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.delay_s and not self.jitter_s:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.delay_s + random.uniform(0, self.jitter_s)
        time.sleep(max(0.0, start - now))


class _QuietLogger:
    """yt-dlp's logger: prints nothing (``quiet=True`` alone still prints ERROR lines); the
    errors reach the ledger through the exception yt-dlp raises."""

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        pass


def check_ids(item: Item) -> None:
    """Stage 0 validated the ids, but a clip table can be edited or come from elsewhere: an id
    reaches a URL and the clip id a file path only when both have exactly the expected form."""
    from stages.manifest import clip_id_for, is_valid_youtube_id

    yt, start, end = str(item["youtube_id"]), int(item["start_s"]), int(item["end_s"])
    if not is_valid_youtube_id(yt) or item.clip_id != clip_id_for(yt, start, end - start):
        raise PermanentError(
            "invalid_id",
            f"clip {item.clip_id!r}: youtube_id {yt!r} is not 11 of [A-Za-z0-9_-] or does not match the "
            "clip id; no URL or path is built from it",
        )


class DownloadStage(ItemStage):
    number = 1
    name = "download"
    upstream = "manifest"
    description = "Download each clip's 10-s section with yt-dlp; validate it by decoding."
    resources = Resources(cpus=1.0)

    @property
    def cfg(self) -> DownloadConfig:
        return self.config.download  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("video_path", pa.string()),
            pa.field("video_duration_s", pa.float64()),
            pa.field("audio_duration_s", pa.float64()),
            pa.field("source_duration_s", pa.float64()),
            pa.field("video_width", pa.int32()),
            pa.field("video_height", pa.int32()),
            pa.field("file_bytes", pa.int64()),
            pa.field("source_url", pa.string()),
        ]

    def setup(self) -> None:
        from stages.tools import ffmpeg

        # The system's ffmpeg, else imageio-ffmpeg's; a missing one stops the run with one line.
        self._ffmpeg = ffmpeg("by yt-dlp to cut clip sections")
        if self.cfg.cookies_file is not None and not self.cfg.cookies_file.is_file():
            raise AbortRun(f"download.cookies_file not found: {self.cfg.cookies_file}")
        if "{id}" not in self.cfg.url_template:
            raise AbortRun(f"download.url_template has no {{id}}: {self.cfg.url_template!r}")
        self._polite = _Politeness(self.cfg.delay_s, self.cfg.jitter_s)
        (self.ctx.media_dir / "video").mkdir(parents=True, exist_ok=True)
        self.ctx.tmp_dir.mkdir(parents=True, exist_ok=True)

    def process(self, batch: list[Item]) -> list[Result]:
        if len(batch) == 1 or self.cfg.concurrency == 1:
            return [self._one(item) for item in batch]
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(batch))) as pool:
            return list(pool.map(self._one, batch))

    def _one(self, item: Item) -> Result:
        try:
            return Result.ok(item.clip_id, **self.download(item))
        except ItemError as exc:
            return Result.failed(item.clip_id, exc)

    def _ydl_options(self, outtmpl: str, start: float, end: float, logger: _QuietLogger) -> dict[str, Any]:
        from yt_dlp.utils import download_range_func

        cfg = self.cfg
        h = cfg.max_height
        opts: dict[str, Any] = {
            "outtmpl": outtmpl,
            # The height filter allows unknown heights (direct files); the scale filter below caps them.
            "format": f"bv*[height<=?{h}]+ba/b[height<=?{h}]/b",
            "format_sort": [f"res:{h}", "ext:mp4:m4a"],  # h264/aac: a fast exact-cut re-encode
            "merge_output_format": "mp4",
            "download_ranges": download_range_func(None, [(start, end)]),
            "force_keyframes_at_cuts": True,
            "ffmpeg_location": self._ffmpeg,
            "external_downloader_args": {
                "ffmpeg_i": ["-rw_timeout", str(int(cfg.read_timeout_s * 1e6))],
                "ffmpeg_o": [
                    *("-preset", cfg.encode_preset, "-vf", f"scale=-2:'min(ih,{h})'"),
                    *("-force_key_frames", f"expr:gte(t,n_forced*{cfg.keyframe_interval_s:g})"),
                ],
            },
            "socket_timeout": cfg.socket_timeout_s,
            "retries": cfg.retries,
            "fragment_retries": cfg.retries,
            "extractor_retries": cfg.retries,
            "noplaylist": True,
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "logger": logger,
            "overwrites": True,
            "continuedl": False,
            "cachedir": False,
        }
        if cfg.proxy:
            opts["proxy"] = cfg.proxy
        if cfg.rate_limit:
            opts["ratelimit"] = cfg.rate_limit
        return opts

    def download(self, item: Item) -> dict[str, Any]:
        """Fetch, validate and place one clip; return its output columns or raise an ItemError."""
        import yt_dlp

        from stages.tools import ytdlp_use_ffmpeg

        cfg = self.cfg
        clip_id = item.clip_id
        start, end = float(item["start_s"]), float(item["end_s"])
        check_ids(item)
        url = cfg.url_template.format(id=item["youtube_id"])
        video_dir = self.ctx.media_dir / "video"

        if cfg.reuse_existing:
            for old in video_dir.glob(f"{clip_id}.*"):
                try:
                    return self._validate_and_place(old, old, url, end - start, None)
                except ItemError:
                    old.unlink(missing_ok=True)  # invalid: download it again

        # yt-dlp writes into the run's flat temp folder (cheap to list and to clean after a
        # crash); the validated file is then renamed into the media folder.
        stem = temp_name(clip_id)
        tmp_dir = self.ctx.tmp_dir
        logger = _QuietLogger()
        self._polite.wait()
        opts = self._ydl_options(str(tmp_dir / f"{stem}.%(ext)s"), start, end, logger)
        ytdlp_use_ffmpeg(self._ffmpeg)  # for the section download too, not only post-processing
        cookies = None
        try:
            if cfg.cookies_file is not None:
                # yt-dlp writes its cookie jar back on close: give each download a private copy,
                # so threads never write the user's file (or one another's) at the same time.
                cookies = _private_copy(cfg.cookies_file)
                opts["cookiefile"] = str(cookies)
            with yt_dlp.YoutubeDL(opts) as ydl:
                # Two steps, so that a failed transfer still knows the media URL to probe.
                try:
                    info = ydl.extract_info(url, download=False)
                except Exception as exc:
                    raise classify(exc) from exc
                media_url = self._media_url(info, url)
                try:
                    info = ydl.process_ie_result(info, download=True)
                except Exception as exc:
                    err = classify(exc)
                    if err.reason == "download_error" and "ffmpeg exited" in str(exc):
                        # yt-dlp runs ffmpeg quietly; probe the media to learn why it failed.
                        probe_source(media_url, cfg.read_timeout_s)
                        err = TransientError("ffmpeg_failed", f"{err.message} (the source probes fine)")
                    raise err from exc
            files = [p for p in tmp_dir.glob(f"{stem}.*") if p.suffix in (".mp4", ".mkv", ".webm")]
            if not files or files[0].stat().st_size == 0:
                raise TransientError("no_file", "yt-dlp reported success but wrote no file")
            src_dur = info.get("duration")
            if not src_dur:  # direct files: yt-dlp's generic extractor does not know it
                src_dur = probe_source(media_url, cfg.read_timeout_s)
            expected = min(end - start, max(0.0, float(src_dur) - start)) if src_dur else end - start
            dest = video_dir / f"{clip_id}{files[0].suffix}"
            return self._validate_and_place(files[0], dest, url, expected, src_dur)
        finally:
            for p in tmp_dir.glob(f"{stem}*"):  # yt-dlp's .part/.ytdl leftovers included
                p.unlink(missing_ok=True)
            if cookies is not None:
                cookies.unlink(missing_ok=True)

    @staticmethod
    def _media_url(info: dict[str, Any], url: str) -> str:
        """The URL of the media itself (the video format's, when video and audio are separate)."""
        formats = info.get("requested_formats") or [info]
        for fmt in formats:
            if isinstance(fmt.get("url"), str) and fmt.get("vcodec") != "none":
                return str(fmt["url"])
        return str(info.get("url") or url)

    def _validate_and_place(
        self, path: Path, dest: Path, url: str, expected_s: float, src_dur: float | None
    ) -> dict[str, Any]:
        cfg = self.cfg
        try:
            found = decode_media(path)
        except ItemError:
            raise
        except Exception as exc:  # PyAV: InvalidDataError and friends
            raise PermanentError("corrupt_download", f"{dest.name}: cannot decode: {exc}") from exc
        if cfg.require_audio and not found["has_audio"]:
            raise PermanentError("no_audio", f"{dest.name}: the source has no audio stream")
        duration = found["video_end_s"]
        if expected_s <= 0:
            raise PermanentError("too_short", f"source ends before the clip starts ({src_dur} s)")
        if duration < expected_s - cfg.duration_tolerance_s:
            raise TransientError(
                "truncated", f"{dest.name}: {duration:.2f} s of video decoded, {expected_s:.2f} s expected"
            )
        if path != dest:
            with atomic_path(dest, self.ctx.tmp_dir) as tmp:
                os.replace(path, tmp)
        rel = dest.relative_to(self.ctx.workdir).as_posix()
        return {
            "video_path": rel,
            "video_duration_s": round(duration, 3),
            "audio_duration_s": round(found["audio_end_s"], 3),
            "source_duration_s": float(src_dur) if src_dur else None,
            "video_width": found["width"],
            "video_height": found["height"],
            "file_bytes": dest.stat().st_size,
            "source_url": url,
        }

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        """The availability report: per split, downloaded / permanent by reason / transient."""
        return availability_report(self, state)


def availability_report(stage: ItemStage, state: pd.DataFrame) -> dict[str, Any]:
    try:
        eligible = eligible_frame(stage, stage.ctx, ["split"])
    except AbortRun:
        return {}
    report: dict[str, Any] = {}
    splits = eligible["split"] if "split" in eligible.columns else None
    groups = eligible.groupby(splits) if splits is not None else [("all", eligible)]
    for split, group in groups:
        cur = state.reindex(group.index)
        status = cur["status"].astype(object).fillna("pending")
        n = len(group)
        ok = int((status == "ok").sum())
        perm = cur[status == "failed_permanent"]["reason"].value_counts().sort_index()
        trans = cur[status == "failed_transient"]["reason"].value_counts().sort_index()
        report[str(split)] = {
            "clips": n,
            "downloaded": ok,
            "available_pct": round(100.0 * ok / n, 2) if n else None,
            "permanent": {str(k): int(v) for k, v in perm.items()},
            "transient": {str(k): int(v) for k, v in trans.items()},
            "pending": int((status == "pending").sum()),
        }
    return {"availability": report}
