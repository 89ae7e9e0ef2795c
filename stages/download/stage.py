"""Stage 1: download each clip's 10-s section with yt-dlp, and validate it by decoding.

yt-dlp runs through its Python API on a URL made from ``download.url_template`` (YouTube by
default; tests and the demo point it at 127.0.0.1). Only the clip's section is fetched
(``download_ranges``), cut exactly (``force_keyframes_at_cuts``: ffmpeg re-encodes the section)
and capped in height. Nothing can hang: yt-dlp has a socket timeout, ffmpeg a read timeout
(``-rw_timeout``), the source probe an open/read timeout, and each clip a wall-clock bound
(``clip_timeout_s``: a trickling source fails ``slow_transfer``).

Every download start goes through one start gate per host and run folder
(:mod:`stages.download.limits`): an even pace (``max_per_hour``, ``delay_s``, ``jitter_s``) shared
by every process and Ray worker, and a circuit breaker that stops starting downloads while the
source refuses this address (bot checks, HTTP 429), probes with one clip after a cool-down, and
stops the run (exit 4) when the cool-downs do not help.

YouTube needs a JavaScript runtime for yt-dlp to see every format (deno, installed with the
pipeline from PyPI): :meth:`DownloadStage.setup` checks that yt-dlp finds one.

Clips are stored at ``media/video/<2 hex of blake2b(clip_id)>/<clip_id>.<ext>`` (256 folders), so
finding or placing a clip never lists a folder; the ledger's ``video_path`` says where each one is
(old run folders keep their flat ``media/video/<clip_id>.<ext>`` rows and files).

yt-dlp can report success on an empty, stream-less or truncated file, so every file is decoded
with PyAV before it counts (:mod:`stages.download.media`: both streams present, duration within
tolerance of 10 s or of the source's end). Failures are classified
(:mod:`stages.download.failures`) into permanent reasons (``private``, ``removed``,
``copyright``, ``http_404``...) that are never retried, and transient ones (``http_429``,
``bot_check``, ``timeout``...) that the runner retries with backoff.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError, PermanentError, RunThrottled, TransientError
from pipeline.io import atomic_path, temp_name
from pipeline.machine import machine_cause
from pipeline.selection import upstream_ok
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.download.availability import availability_report, sources_note
from stages.download.config import DownloadConfig
from stages.download.failures import classify
from stages.download.index import iter_local, open_index, wanted_keys
from stages.download.layout import VIDEO_SUFFIXES, existing_videos, video_path
from stages.download.limits import (
    ClipDeadline,
    GateCancelled,
    GateSettings,
    StartGate,
    breaker_summary,
)
from stages.download.local import LocalMedia, Taken
from stages.download.media import decode_media, probe_source
from stages.download.sources import YoutubeSource, check_sources, source_pattern

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    import pyarrow as pa

    #: Given whether a download has its own sound: the sound to use instead (None: its own).
    AudioFor = Callable[[bool], Taken | None]


def _private_copy(path: Path) -> Path:
    """A copy of ``path`` readable only by this user, in the system temp folder (not the run
    folder: cookies are secrets)."""
    import shutil
    import tempfile

    fd, name = tempfile.mkstemp(prefix="avcaps-cookies-", suffix=".txt")
    os.close(fd)  # mkstemp made it 0600
    shutil.copyfile(path, name)
    return Path(name)


class _QuietLogger:
    """yt-dlp's logger: prints nothing (``quiet=True`` alone still prints ERROR lines) and keeps
    the warnings for the ledger's message; the errors reach the ledger through the exception
    yt-dlp raises."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def error(self, msg: str) -> None:
        pass


def with_warnings(message: str, warnings: Sequence[str], limit: int = 1500) -> str:
    """``message`` followed by yt-dlp's warnings (they often say why: missing formats, a PO token)."""
    if not warnings:
        return message
    text = " | ".join(w.removeprefix("WARNING: ") for w in warnings)
    joined = f"{message} [yt-dlp warnings: {text}]" if message else f"yt-dlp warnings: {text}"
    return joined[:limit]


def js_runtimes_option(specs: Sequence[str]) -> dict[str, dict[str, str]]:
    """``download.js_runtimes`` as yt-dlp's ``js_runtimes`` option (its --js-runtimes NAME[:PATH])."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, _, path = spec.partition(":")
        out[name.strip().lower()] = {"path": path} if path else {}
    return out


def found_js_runtimes(specs: Sequence[str]) -> list[str]:
    """The JavaScript runtimes yt-dlp finds and supports with these settings, as ``yt-dlp -v``
    lists them (e.g. ``deno-2.9.8``)."""
    import yt_dlp

    opts = {"quiet": True, "logger": _QuietLogger(), "js_runtimes": js_runtimes_option(specs)}
    with yt_dlp.YoutubeDL(opts) as ydl:
        runtimes = getattr(ydl, "_js_runtimes", None)
        if runtimes is None:  # yt-dlp moved it: do not block a run on our own check
            return ["unknown"]
        return sorted(
            f"{rt.info.name}-{rt.info.version}"
            for rt in runtimes.values()
            if rt is not None and rt.info is not None and rt.info.supported is not False
        )


def warm_up(url_template: str) -> None:
    """Load yt-dlp's extractor for ``url_template`` now: the first extraction in a process
    otherwise imports it (seconds on a busy machine) while holding an import lock, and the starts
    the gate spaced out would reach the source together when it is done."""
    import yt_dlp
    from yt_dlp.extractor import gen_extractor_classes

    url = url_template.format(id="aaaaaaaaaaa")
    with yt_dlp.YoutubeDL({"quiet": True, "logger": _QuietLogger()}) as ydl:
        for ie in gen_extractor_classes():
            if ie.suitable(url):
                ydl.get_info_extractor(ie.ie_key())
                break


def is_youtube(url_template: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(url_template.replace("{id}", "x")).hostname or "").lower()
    return host == "youtu.be" or host == "youtube.com" or host.endswith(".youtube.com")


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


class DownloadStage(ItemStage[DownloadConfig]):
    number = 1
    name = "download"
    upstream = "manifest"
    description = "Download each clip's 10-s section with yt-dlp; validate it by decoding."
    resources = Resources(cpus=1.0)

    def fingerprint_settings(self) -> dict[str, Any]:
        # What the saved clip is made of: its size cap, cut and encoding (not politeness or timeouts).
        cfg = self.cfg
        return {
            "max_height": cfg.max_height,
            "keyframe_interval_s": cfg.keyframe_interval_s,
            "encode_preset": cfg.encode_preset,
            "require_audio": cfg.require_audio,
        }

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
            # Provenance per stream: the source (kind:name), what it came from (a file's path,
            # shard:member, a dataset row, a URL) and the sha256 of those source bytes (none for
            # YouTube, whose file is not at hand).
            pa.field("video_source", pa.string()),
            pa.field("video_ref", pa.string()),
            pa.field("video_digest", pa.string()),
            pa.field("audio_source", pa.string()),
            pa.field("audio_ref", pa.string()),
            pa.field("audio_digest", pa.string()),
        ]

    def write_dirs(self) -> list[Path]:
        """The media (through its temp folder) and, with local sources, their indexes."""
        return [*super().write_dirs(), self.folder / "sources"]

    def setup(self) -> None:
        cfg = self.cfg
        self._sources: list[Any] = list(cfg.sources) or [YoutubeSource(kind="youtube")]
        check_sources(self._sources)
        self._youtube = [s for s in self._sources if s.kind == "youtube"]
        indexes = {}
        clips = None
        for i, src in iter_local(self._sources):
            what = f"download.sources[{i}] ({src.label})"
            if clips is None:  # the run's clips: only their entries are kept for lookups
                clips = upstream_ok(type(self), self.ctx, ["youtube_id", "audiocap_ids"])
            holds = source_pattern(src, what).holds
            index = open_index(self.folder / "sources", src, what, wanted=wanted_keys(holds, clips))
            if index.meta["names"] and not index.meta["matched"]:
                raise AbortRun(
                    f"{what}: none of its {index.meta['names']} name(s) matches the pattern "
                    f"({', '.join(index.meta['examples'][:3])} ...): check `pattern` (avcaps sources)"
                )
            indexes[src.label] = index
        self._local = LocalMedia(indexes, cfg, VIDEO_SUFFIXES)
        if self._youtube:  # after the local sources: a bad one stops the run before yt-dlp loads
            self._setup_youtube()
        (self.ctx.media_dir / "video").mkdir(parents=True, exist_ok=True)
        self.ctx.tmp_dir.mkdir(parents=True, exist_ok=True)

    def _setup_youtube(self) -> None:
        from stages.tools import ffmpeg

        # The system's ffmpeg, else imageio-ffmpeg's; a missing one stops the run with one line.
        self._ffmpeg = ffmpeg("by yt-dlp to cut clip sections")
        if self.cfg.cookies_file is not None and not self.cfg.cookies_file.is_file():
            raise AbortRun(f"download.cookies_file not found: {self.cfg.cookies_file}")
        for template in dict.fromkeys(self._template(s) for s in self._youtube):
            if "{id}" not in template:
                raise AbortRun(f"download.url_template has no {{id}}: {template!r}")
            self._check_js_runtime(template)
            warm_up(template)
        self._gate = StartGate(self.folder / "limits", GateSettings.of(self.cfg))

    def _template(self, src: YoutubeSource) -> str:
        return src.url_template or self.cfg.url_template

    def _check_js_runtime(self, template: str) -> None:
        cfg = self.cfg
        required = cfg.require_js_runtime
        if required is None:
            required = is_youtube(template)
        if required and not found_js_runtimes(cfg.js_runtimes):
            raise AbortRun(
                f"yt-dlp finds no JavaScript runtime (download.js_runtimes: {', '.join(cfg.js_runtimes)}), "
                "and YouTube hides formats without one: pip install 'yt-dlp[default]' deno into this "
                "environment (or set download.js_runtimes to node:/path/to/node), check with `yt-dlp -v` "
                "(JS runtimes: deno-...), or set download.require_js_runtime=false"
            )

    def process(self, batch: list[Item]) -> list[Result]:
        """Download the batch, ``concurrency`` clips at a time, each start through the gate.

        When the breaker gives up, the clips that were waiting for a start never reached the
        source: the batch's finished results travel with the RunThrottled the runner commits,
        and the waiting clips get no row (no attempt spent)."""
        stops: list[RunThrottled] = []

        def one(item: Item) -> Result | None:
            try:
                return self._one(item)
            except RunThrottled as exc:
                stops.append(exc)
            except GateCancelled:
                pass
            return None

        if len(batch) == 1 or self.cfg.concurrency == 1:
            out = []
            for item in batch:
                out.append(one(item))
                if stops:
                    break
        else:
            pool = ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(batch)))
            futures: list[Future[Result | None]] = [pool.submit(one, item) for item in batch]
            try:
                out = [f.result() for f in futures]
            except BaseException as exc:
                if not isinstance(exc, Exception):
                    # Ctrl-C / SIGTERM: clips waiting for a start (possibly a long cool-down) give
                    # up at once; downloads in flight end by themselves (each is bounded). An
                    # ordinary exception leaves the gate open: the runner redoes the batch item
                    # by item.
                    self._gate.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        done = [r for r in out if r is not None]
        if stops:
            raise RunThrottled(str(stops[0]), results=done)
        return done

    def _one(self, item: Item) -> Result:
        logger = _QuietLogger()
        try:
            outputs = self.download(item, logger)
        except ItemError as exc:
            exc.message = with_warnings(exc.message, logger.warnings)
            return Result.failed(item.clip_id, exc)
        notes = outputs.pop("_notes", [])
        message = with_warnings("; ".join(f"taken after {n}" for n in notes), logger.warnings)
        return Result(item.clip_id, "ok", outputs, "", message)

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
            "js_runtimes": js_runtimes_option(cfg.js_runtimes),
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

    def download(self, item: Item, logger: _QuietLogger | None = None) -> dict[str, Any]:
        """Take one clip from the first source that holds a valid copy (fetch, check, place);
        return its output columns or raise an ItemError."""
        cfg = self.cfg
        clip_id = item.clip_id
        start, end = float(item["start_s"]), float(item["end_s"])
        check_ids(item)
        media = self.ctx.media_dir

        if cfg.reuse_existing:
            # A file a killed run left in place: from YouTube when that is the only source, else
            # from a source the ledger never heard of ("earlier_run").
            only_yt = len(self._sources) == 1 and self._sources[0].kind == "youtube"
            origin = self._template(self._sources[0]).format(id=item["youtube_id"]) if only_yt else None
            for old in existing_videos(media, clip_id):
                try:
                    dest = video_path(media, clip_id, old.suffix)  # an old flat file moves in
                    out = self._validate_and_place(old, dest, origin, end - start, None)
                    if origin is None:
                        ref = dest.relative_to(self.ctx.workdir).as_posix()
                        out.update(dict.fromkeys(("video_source", "audio_source"), "earlier_run"))
                        out.update(video_ref=ref, audio_ref=ref)
                    return out
                except ItemError:
                    old.unlink(missing_ok=True)  # invalid: take it again

        return self._take(item, logger or _QuietLogger())

    def _take(self, item: Item, logger: _QuietLogger) -> dict[str, Any]:
        """The sources in order: the first that gives a valid picture gives the clip; its sound is
        an audio-only source's listed before it, else its own, else a later audio-only source's.
        A source that fails (a corrupt file, a video without sound) is noted and the next tried."""
        tried: list[str] = []
        last: ItemError | None = None
        audio: Taken | None = None  # the sound of an audio-only source listed before the picture's
        for i, src in enumerate(self._sources):
            try:
                if src.kind == "youtube":
                    url = self._template(src).format(id=item["youtube_id"])

                    def audio_for(own: bool, i: int = i, early: Taken | None = audio) -> Taken | None:
                        return early or (None if own else self._later_audio(item, i, tried))

                    out = self._fetch(item, url, src.label, logger, audio_for)
                elif src.streams == "audio":
                    if audio is None:
                        audio = self._local.audio(src.label, item)
                    continue
                else:
                    video = self._local.video(src.label, item)
                    if video is None:
                        continue
                    use = audio
                    if use is None and not (video.has_audio and src.streams == "both"):
                        use = self._later_audio(item, i, tried)
                    out = self._place_local(item, video, use)
            except ItemError as exc:
                if exc.reason == "ambiguous_source":
                    raise
                tried.append(f"{src.label}: {exc.reason}: {exc.message}")
                last = exc
                continue
            if tried:
                out["_notes"] = tried
            return out
        if last is not None:
            last.message = " | ".join(tried) if len(tried) > 1 else last.message
            raise last
        if audio is not None:
            raise PermanentError(
                "no_video", f"{audio.label} has the sound ({audio.ref}) but no source has the picture"
            )
        names = ", ".join(s.label for s in self._sources)
        raise PermanentError(
            "not_in_sources",
            f"no source holds clip {item.clip_id} (looked in {names}); add a source, then --retry-failed",
        )

    def _later_audio(self, item: Item, after: int, tried: list[str]) -> Taken | None:
        """The sound from the first audio-only source after source ``after`` that has it valid."""
        for src in self._sources[after + 1 :]:
            if src.kind == "youtube" or src.streams != "audio":
                continue
            try:
                found = self._local.audio(src.label, item)
            except ItemError as exc:
                if exc.reason == "ambiguous_source":
                    raise
                tried.append(f"{src.label}: {exc.reason}: {exc.message}")
                continue
            if found is not None:
                return found
        return None

    def _place_local(self, item: Item, video: Taken, audio: Taken | None) -> dict[str, Any]:
        """Place a local source's clip (as it is, or cut with its sound) and describe it."""
        if audio is None and not video.has_audio and self.cfg.require_audio:
            raise PermanentError(
                "no_audio", f"{video.ref}: no audio stream, and no audio source has the clip"
            )
        media = self.ctx.media_dir
        dest, info = self._local.build(
            lambda sfx: video_path(media, item.clip_id, sfx), self.ctx.tmp_dir, video, audio
        )
        return self._outputs(dest, info, video, audio, video.source_duration_s)

    def _outputs(
        self, dest: Path, info: dict[str, Any], video: Taken, audio: Taken | None, src_dur: float | None
    ) -> dict[str, Any]:
        sound = audio if audio is not None else video
        if not info.get("has_audio"):
            sound = None
        digest = video.digest() if video.url is None else None
        return {
            "video_path": dest.relative_to(self.ctx.workdir).as_posix(),
            "video_duration_s": round(info["video_end_s"], 3),
            "audio_duration_s": round(info["audio_end_s"], 3),
            "source_duration_s": float(src_dur) if src_dur else None,
            "video_width": info["width"],
            "video_height": info["height"],
            "file_bytes": dest.stat().st_size,
            "source_url": video.url,
            "video_source": video.label,
            "video_ref": video.ref,
            "video_digest": digest,
            "audio_source": sound.label if sound else None,
            "audio_ref": sound.ref if sound else None,
            "audio_digest": (digest if sound is video else sound.digest()) if sound else None,
        }

    def _fetch(
        self, item: Item, url: str, label: str, logger: _QuietLogger, audio_for: AudioFor | None = None
    ) -> dict[str, Any]:
        """Download the clip's section from ``url`` with yt-dlp, check it and place it."""
        import yt_dlp

        from stages.tools import ytdlp_use_ffmpeg

        cfg = self.cfg
        clip_id = item.clip_id
        start, end = float(item["start_s"]), float(item["end_s"])
        # yt-dlp writes into the run's flat temp folder (cheap to list and to clean after a
        # crash); the validated file is then renamed into the media folder.
        stem = temp_name(clip_id)
        tmp_dir = self.ctx.tmp_dir
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
                # The gate is passed once yt-dlp is set up (seconds, the first time in a process),
                # so that a granted start is the first request the source sees.
                ticket = self._gate.acquire()
                reason: str | None = None
                try:
                    with ClipDeadline(stem, cfg.clip_timeout_s) as deadline:
                        info, media_url = self._transfer(ydl, url, deadline)
                    files = [p for p in tmp_dir.glob(f"{stem}.*") if p.suffix in VIDEO_SUFFIXES]
                    if not files or files[0].stat().st_size == 0:
                        raise TransientError("no_file", "yt-dlp reported success but wrote no file")
                    src_dur = info.get("duration")
                    if not src_dur:  # direct files: yt-dlp's generic extractor does not know it
                        src_dur = probe_source(
                            media_url, min(cfg.read_timeout_s, max(1.0, deadline.remaining()))
                        )
                    expected = min(end - start, max(0.0, float(src_dur) - start)) if src_dur else end - start
                    dest = video_path(self.ctx.media_dir, clip_id, files[0].suffix)
                    return self._validate_and_place(files[0], dest, url, expected, src_dur, label, audio_for)
                except ItemError as exc:
                    reason = exc.reason
                    raise
                finally:
                    self._gate.report(ticket, reason)
        finally:
            for p in tmp_dir.glob(f"{stem}*"):  # yt-dlp's .part/.ytdl leftovers included
                p.unlink(missing_ok=True)
            if cookies is not None:
                cookies.unlink(missing_ok=True)

    def _transfer(self, ydl: Any, url: str, deadline: ClipDeadline) -> tuple[dict[str, Any], str]:
        """Extract and download with yt-dlp; return its info and the media URL, or raise the
        classified failure (``slow_transfer`` once past the deadline)."""
        # Two steps, so that a failed transfer still knows the media URL to probe.
        try:
            info = ydl.extract_info(url, download=False)
        except Exception as exc:
            raise self._past(deadline) or classify(exc) from exc
        media_url = self._media_url(info, url)
        try:
            info = ydl.process_ie_result(info, download=True)
        except Exception as exc:
            err = self._past(deadline) or classify(exc)
            if err.reason == "download_error" and "ffmpeg exited" in str(exc):
                # yt-dlp runs ffmpeg quietly; probe the media to learn why it failed.
                probe_source(media_url, min(self.cfg.read_timeout_s, max(1.0, deadline.remaining())))
                err = TransientError("ffmpeg_failed", f"{err.message} (the source probes fine)")
            raise err from exc
        if past := self._past(deadline):
            raise past
        return info, media_url

    def _past(self, deadline: ClipDeadline) -> TransientError | None:
        """The ``slow_transfer`` failure of a clip that ran past ``clip_timeout_s``, else None."""
        if not deadline.expired:
            return None
        return TransientError(
            "slow_transfer",
            f"still transferring after {deadline.elapsed:.0f} s (download.clip_timeout_s = "
            f"{self.cfg.clip_timeout_s:g}): the source sends too slowly; stopped"
            + (f" ({deadline.killed} ffmpeg process(es) killed)" if deadline.killed else ""),
        )

    @staticmethod
    def _media_url(info: dict[str, Any], url: str) -> str:
        """The URL of the media itself (the video format's, when video and audio are separate)."""
        formats = info.get("requested_formats") or [info]
        for fmt in formats:
            if isinstance(fmt.get("url"), str) and fmt.get("vcodec") != "none":
                return str(fmt["url"])
        return str(info.get("url") or url)

    def _validate_and_place(
        self,
        path: Path,
        dest: Path,
        url: str | None,
        expected_s: float,
        src_dur: float | None,
        label: str = "youtube:youtube",
        audio_for: AudioFor | None = None,
    ) -> dict[str, Any]:
        """Check a downloaded (or left in place) file by decoding it, and place it; its sound
        replaced by an audio source's when ``audio_for`` gives one (see :meth:`_take`)."""
        cfg = self.cfg
        try:
            found = decode_media(path, dest.name)
        except ItemError:
            raise
        except Exception as exc:  # PyAV: InvalidDataError and friends
            if machine_cause(exc) is not None:  # no file handles, no memory: not the file's fault
                raise
            raise PermanentError("corrupt_download", f"{dest.name}: cannot decode: {exc}") from exc
        duration = found["video_end_s"]
        if expected_s <= 0:
            raise PermanentError("too_short", f"source ends before the clip starts ({src_dur} s)")
        if duration < expected_s - cfg.duration_tolerance_s:
            raise TransientError(
                "truncated", f"{dest.name}: {duration:.2f} s of video decoded, {expected_s:.2f} s expected"
            )
        ref = url or dest.relative_to(self.ctx.workdir).as_posix()
        video = Taken(label, ref, path, True, 0.0, expected_s, found, url=url, suffix=dest.suffix)
        audio = audio_for(found["has_audio"]) if audio_for is not None else None
        if audio is not None:
            placed, info = self._local.build(
                lambda sfx: dest.with_suffix(sfx), self.ctx.tmp_dir, video, audio
            )
            if path != placed:
                path.unlink(missing_ok=True)
            return self._outputs(placed, info, video, audio, src_dur)
        if cfg.require_audio and not found["has_audio"]:
            raise PermanentError("no_audio", f"{dest.name}: the source has no audio stream")
        if path != dest:
            with atomic_path(dest, self.ctx.tmp_dir) as tmp:
                os.replace(path, tmp)
        return self._outputs(dest, found, video, None, src_dur)

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        """The availability report (per split, set against the public downloaders' figures), the
        breaker's record per host, and notes for ``avcaps status``."""
        out = availability_report(self, state)
        notes = [n for split in out.get("availability", {}).values() if (n := split.pop("note", None))]
        if line := sources_note(out.get("availability", {})):
            notes.insert(0, line)
        breaker = breaker_summary(self.folder / "limits")
        if breaker:
            out["breaker"] = breaker
        for host, b in breaker.items():
            if b["trips"] or b["state"] != "closed":
                notes.append(
                    f"rate-limit breaker on {host}: {b['state']}, tripped {b['trips']} time(s)"
                    + (f", last at {b['last_trip_at']}" if b["last_trip_at"] else "")
                    + f", {b['cooldowns']} cool-down(s) ({b['cooldown_s']:g} s)"
                    + (f"; gave up at {b['gave_up_at']} (exit 4)" if b["gave_up_at"] else "")
                )
        out["notes"] = notes
        return out
