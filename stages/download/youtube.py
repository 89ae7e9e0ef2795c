"""Stage 1's youtube source: yt-dlp fetches a clip's 10-s section from a URL.

yt-dlp runs through its Python API on a URL made from ``download.url_template`` (YouTube by
default; tests and the demo point it at 127.0.0.1). Only the clip's section is fetched
(``download_ranges``), cut exactly (``force_keyframes_at_cuts``: ffmpeg re-encodes the section)
and capped in height. Nothing can hang: yt-dlp has a socket timeout, ffmpeg a read timeout
(``-rw_timeout``), the source probe an open/read timeout, and each clip a wall-clock bound
(``clip_timeout_s``: a trickling source fails ``slow_transfer``).

Every download start goes through one start gate per host and run folder
(:mod:`stages.download.limits`), passed once yt-dlp is set up, so that a granted start is the
first request the source sees.

YouTube needs a JavaScript runtime for yt-dlp to see every format (deno, installed with the
pipeline from PyPI): :class:`YoutubeFetcher` checks at setup that yt-dlp finds one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError, TransientError
from pipeline.io import temp_name
from stages.download.failures import classify
from stages.download.layout import VIDEO_SUFFIXES
from stages.download.limits import ClipDeadline, GateSettings, StartGate
from stages.download.media import probe_source

if TYPE_CHECKING:
    from collections.abc import Callable

    from stages.download.config import DownloadConfig

    #: Checks the file yt-dlp wrote and places it, given the file, the seconds of the clip the
    #: source has and the source's duration: the clip's output columns (or it raises an ItemError).
    Place = Callable[[Path, float, float | None], dict[str, Any]]


class QuietLogger:
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


def _private_copy(path: Path) -> Path:
    """A copy of ``path`` readable only by this user, in the system temp folder (not the run
    folder: cookies are secrets)."""
    import shutil
    import tempfile

    fd, name = tempfile.mkstemp(prefix="avcaps-cookies-", suffix=".txt")
    os.close(fd)  # mkstemp made it 0600
    shutil.copyfile(path, name)
    return Path(name)


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

    opts = {"quiet": True, "logger": QuietLogger(), "js_runtimes": js_runtimes_option(specs)}
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
    with yt_dlp.YoutubeDL({"quiet": True, "logger": QuietLogger()}) as ydl:
        for ie in gen_extractor_classes():
            if ie.suitable(url):
                ydl.get_info_extractor(ie.ie_key())
                break


def is_youtube(url_template: str) -> bool:
    from urllib.parse import urlsplit

    host = (urlsplit(url_template.replace("{id}", "x")).hostname or "").lower()
    return host == "youtu.be" or host == "youtube.com" or host.endswith(".youtube.com")


def check_js_runtime(cfg: DownloadConfig, template: str) -> None:
    """Stop the run unless yt-dlp finds a JavaScript runtime, where one is required (by default
    for YouTube URLs: without one YouTube hides formats)."""
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


class YoutubeFetcher:
    """yt-dlp as stage 1 runs it: set up once per process (ffmpeg, cookies, the URL templates, a
    JavaScript runtime, the extractor loaded, the start gate), then :meth:`fetch` once per clip,
    from any of the batch's threads."""

    def __init__(
        self, cfg: DownloadConfig, templates: Iterable[str], limits_dir: Path, tmp_dir: Path
    ) -> None:
        from stages.tools import ffmpeg

        self.cfg = cfg
        self.tmp_dir = tmp_dir
        # The system's ffmpeg, else imageio-ffmpeg's; a missing one stops the run with one line.
        self.ffmpeg = ffmpeg("by yt-dlp to cut clip sections")
        if cfg.cookies_file is not None and not cfg.cookies_file.is_file():
            raise AbortRun(f"download.cookies_file not found: {cfg.cookies_file}")
        for template in dict.fromkeys(templates):
            if "{id}" not in template:
                raise AbortRun(f"download.url_template has no {{id}}: {template!r}")
            check_js_runtime(cfg, template)
            warm_up(template)
        self.gate = StartGate(limits_dir, GateSettings.of(cfg))

    def fetch(
        self, clip_id: str, start: float, end: float, url: str, logger: QuietLogger, place: Place
    ) -> dict[str, Any]:
        """Download the clip's section from ``url`` with yt-dlp, then ``place`` the file it wrote.
        The gate hears how the start ended: the reason of any failure, placing's included."""
        import yt_dlp

        from stages.tools import ytdlp_use_ffmpeg

        cfg = self.cfg
        # yt-dlp writes into the run's flat temp folder (cheap to list and to clean after a
        # crash); the validated file is then renamed into the media folder.
        stem = temp_name(clip_id)
        opts = self._options(str(self.tmp_dir / f"{stem}.%(ext)s"), start, end, logger)
        ytdlp_use_ffmpeg(self.ffmpeg)  # for the section download too, not only post-processing
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
                ticket = self.gate.acquire()
                reason: str | None = None
                try:
                    with ClipDeadline(stem, cfg.clip_timeout_s) as deadline:
                        info, media_url = self._transfer(ydl, url, deadline)
                    return place(*self._written(stem, info, media_url, start, end, deadline))
                except ItemError as exc:
                    reason = exc.reason
                    raise
                finally:
                    self.gate.report(ticket, reason)
        finally:
            for p in self.tmp_dir.glob(f"{stem}*"):  # yt-dlp's .part/.ytdl leftovers included
                p.unlink(missing_ok=True)
            if cookies is not None:
                cookies.unlink(missing_ok=True)

    def _written(
        self,
        stem: str,
        info: dict[str, Any],
        media_url: str,
        start: float,
        end: float,
        deadline: ClipDeadline,
    ) -> tuple[Path, float, float | None]:
        """The file yt-dlp wrote, the seconds of the clip the source has, and the source's duration."""
        files = [p for p in self.tmp_dir.glob(f"{stem}.*") if p.suffix in VIDEO_SUFFIXES]
        if not files or files[0].stat().st_size == 0:
            raise TransientError("no_file", "yt-dlp reported success but wrote no file")
        src_dur = info.get("duration")
        if not src_dur:  # direct files: yt-dlp's generic extractor does not know it
            src_dur = probe_source(media_url, min(self.cfg.read_timeout_s, max(1.0, deadline.remaining())))
        expected = min(end - start, max(0.0, float(src_dur) - start)) if src_dur else end - start
        return files[0], expected, src_dur

    def _options(self, outtmpl: str, start: float, end: float, logger: QuietLogger) -> dict[str, Any]:
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
            "ffmpeg_location": self.ffmpeg,
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
