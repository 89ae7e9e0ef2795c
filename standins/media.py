"""Stand-in media for tests and the demo: generated clips, and an HTTP server with fault modes.

YouTube's own pages cannot be served here, so the download stage runs for real (yt-dlp's generic
extractor, ffmpeg) against files served on 127.0.0.1. The clips are made with ffmpeg (the system's,
else imageio-ffmpeg's: :mod:`stages.tools`):

- the picture is a flat gray whose level changes every second of *source* time
  (:func:`level_for_second`), so a test can tell from a decoded frame which second it came from
  (or black throughout, for the black-frame flag);
- the audio is a 440 Hz tone (or digital silence, or none, for the clip without audio).

The server (:class:`MediaServer`) serves a folder with HTTP Range support (ffmpeg seeks in mp4
files with ranges) and a fault mode per file: an HTTP status, a stall mid-transfer, a source that
trickles (a few bytes every quarter second, so a read timeout never fires), garbage bytes, a
truncated file, each optionally clearing after the first k requests; or one of YouTube's answers
(``private``; ``bot_check``, "Sign in to confirm you're not a bot"; ``formats_missing``, what an
extractor that cannot solve YouTube's JavaScript challenges sees): a redirect to a watch page
whose player response says so, which the yt-dlp plugin in :data:`YTDLP_PLUGINS` reads as yt-dlp's
YouTube extractor would. :meth:`MediaServer.start_wave` makes every request answer with a fault
for a while (a bot-check wave that then recovers), and :attr:`MediaServer.requests` records the
time of every request, so tests can see the rate a run kept and what it asked during a wave.
"""

from __future__ import annotations

import http.server
import json
import os
import random
import re
import socketserver
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from stages.tools import ffmpeg

# (video codec args, audio codec args, container extension) per codec profile.
PROFILES: dict[str, tuple[list[str], list[str], str]] = {
    "h264": (["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"], ["-c:a", "aac"], "mp4"),
    "h264_faststart": (
        ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-movflags", "+faststart"],
        ["-c:a", "aac"],
        "mp4",
    ),
    "mpeg4": (["-c:v", "mpeg4", "-q:v", "5"], ["-c:a", "libmp3lame"], "mkv"),
    "vp9": (["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8"], ["-c:a", "libopus"], "webm"),
}

FAULTS = (
    "404",
    "410",
    "429",
    "500",
    "503",
    "stall",
    "trickle",
    "garbage",
    "truncated",
    "private",
    "bot_check",
    "formats_missing",
)


def _refusal(reason: str, subreason: str) -> dict[str, object]:
    """A refusal as the player response of YouTube's watch page carries it."""
    return {
        "status": "LOGIN_REQUIRED",
        "reason": reason,
        "errorScreen": {
            "playerErrorMessageRenderer": {
                "reason": {"simpleText": reason},
                "subreason": {"simpleText": subreason},
            }
        },
    }


PRIVATE_PLAYABILITY = _refusal("Private video", "Sign in if you've been granted access to this video")
# YouTube's bot check, with its curly apostrophe.
BOT_CHECK_PLAYABILITY = _refusal("Sign in to confirm you’re not a bot", "This helps protect our community")
# Fault modes answered with a redirect to a watch page, and the player response of that page:
# a refusal, or (``formats_missing``) a playable video of which an extractor that cannot solve
# YouTube's JavaScript challenges reads only the storyboard.
WATCH_PAGES: dict[str, dict[str, object]] = {
    "private": {"playabilityStatus": PRIVATE_PLAYABILITY},
    "bot_check": {"playabilityStatus": BOT_CHECK_PLAYABILITY},
    "formats_missing": {"playabilityStatus": {"status": "OK"}, "challenge": "unsolved"},
}
# The folder to put on the PYTHONPATH of a process running stage 1 so that yt-dlp loads the
# stand-in for its YouTube extractor (``yt_dlp_plugins/extractor/avcaps_watch_page.py``), which
# reads the watch pages of the ``private`` fault. Never on the path in production.
YTDLP_PLUGINS = Path(__file__).parent / "ytdlp"


def level_for_second(second: int) -> int:
    """Gray level of the picture during second ``second`` of the source (0..255, steps of 20)."""
    return 15 + 20 * (second % 12)


def second_for_level(level: float) -> int | None:
    """Inverse of :func:`level_for_second` modulo 12 (None when ``level`` is between two steps)."""
    k = round((level - 15) / 20)
    return k if 0 <= k < 12 and abs(level - level_for_second(k)) <= 6 else None


def _encode(
    dest: Path,
    duration_s: float,
    profile: str,
    audio: bool,
    size: str,
    fps: int,
    tone_hz: float,
    black: bool = False,
) -> None:
    vcodec, acodec, _ = PROFILES[profile]
    # geq computes the gray level from the frame time T; 12 levels repeat every 12 s.
    level = "0" if black else "15+20*mod(floor(T+0.0001),12)"
    video = f"color=c=black:s={size}:r={fps}:d={duration_s},format=gray,geq=lum='{level}',format=yuv420p"
    cmd = [ffmpeg("to generate the stand-in media"), "-nostdin", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", video]
    if audio:
        # tone_hz 0 gives digital silence (for the silent-audio flag).
        tone = f"sine=frequency={tone_hz}:sample_rate=44100:duration={duration_s}"
        silence = f"anullsrc=r=44100:cl=mono,atrim=duration={duration_s}"
        cmd += ["-f", "lavfi", "-i", tone if tone_hz else silence]
    cmd += [*vcodec, "-g", str(2 * fps)]
    cmd += [*acodec, "-ac", "1"] if audio else ["-an"]
    cmd += ["-t", str(duration_s), str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)


def make_clip(
    dest: Path,
    duration_s: float,
    *,
    profile: str = "h264",
    audio: bool = True,
    size: str = "96x64",
    fps: int = 10,
    tone_hz: float = 440.0,
    black: bool = False,
) -> Path:
    """Write a test clip of ``duration_s`` seconds to ``dest`` (extension from ``profile``);
    ``black``: a black picture throughout, ``tone_hz=0``: digital silence.

    Clips over a minute (AudioCaps starts go up to 590 s) are a 12-s encoded period (the gray
    levels repeat every 12 s) looped by stream copy, which takes a fraction of the time; the loop
    drifts by a few ms per period (the audio period is a little longer than 12 s), so tests that
    check the level of a frame use clips of a minute or less.
    """
    ext = PROFILES[profile][2]
    dest = dest.with_suffix(f".{ext}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if duration_s <= 60:
        _encode(dest, duration_s, profile, audio, size, fps, tone_hz, black)
        return dest
    base = dest.parent / f".base-{profile}-{int(audio)}-{size}-{fps}-{tone_hz:g}-{int(black)}.{ext}"
    with _BASE_LOCK:
        if not base.exists():
            tmp = base.with_name(f".tmp-{os.getpid()}-{base.name}")
            _encode(tmp, 12, profile, audio, size, fps, tone_hz, black)
            os.replace(tmp, base)
    cmd = [ffmpeg("to generate the stand-in media"), "-nostdin", "-loglevel", "error", "-y"]
    cmd += ["-stream_loop", "-1", "-i", str(base)]
    cmd += ["-c", "copy", "-t", str(duration_s)]
    if PROFILES[profile][0][-2:] == ["-movflags", "+faststart"]:
        cmd += ["-movflags", "+faststart"]
    subprocess.run([*cmd, str(dest)], check=True, capture_output=True)
    return dest


_BASE_LOCK = threading.Lock()


@dataclass
class Fault:
    """A fault served for one file: ``mode`` (one of :data:`FAULTS`) for the first ``times``
    requests (None: for ever), then the file itself."""

    mode: str
    times: int | None = None
    served: int = 0


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read the hit counts
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _send_status(self, code: int) -> None:
        payload = f"{code} stand-in error\n".encode()
        self.send_response(code)
        if code == 429:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send(self, code: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _send_watch_page(self, query: str, body: bool) -> None:
        """A watch page refusing the video as YouTube's does: the reason is in its player response."""
        why = re.search(r"(?:^|&)why=(\w+)", query)
        player = json.dumps(WATCH_PAGES[why[1] if why else "private"])
        page = f"<html><body><script>var ytInitialPlayerResponse = {player};</script></body></html>"
        self._send(200, {"Content-Type": "text/html; charset=utf-8"}, page.encode(), body)

    def _serve(self, body: bool) -> None:
        srv = self.server.media
        name, _, query = self.path.partition("?")
        name = name.lstrip("/")
        if name == "watch":  # only the redirects of the refusal faults lead here
            self._send_watch_page(query, body)
            return
        with srv.lock:
            now = time.time()
            srv.hits[name] = srv.hits.get(name, 0) + 1
            if self.headers.get("Cookie"):
                srv.cookies.setdefault(name, []).append(self.headers["Cookie"])
            fault = srv.faults.get(name)
            mode = None
            if srv.wave is not None:
                wave_mode, seconds, started = srv.wave
                if started is None:  # a wave starts with the first request that meets it
                    srv.wave = (wave_mode, seconds, now)
                    started = now
                if now - started < seconds:
                    mode = wave_mode
                    srv.wave_served += 1
            if mode is None and fault is not None and (fault.times is None or fault.served < fault.times):
                fault.served += 1
                mode = fault.mode
            srv.requests.append((now, name, mode or "file"))
        path = srv.root / name
        if mode is not None and mode.isdigit():
            self._send_status(int(mode))
            return
        if mode in WATCH_PAGES:
            video_id = name.rsplit(".", 1)[0]
            self._send(302, {"Location": f"/watch?v={video_id}&why={mode}"}, b"", body)
            return
        if not path.is_file() or "/" in name:
            self._send_status(404)
            return
        data = path.read_bytes()
        if mode == "garbage":
            data = random.Random(name).randbytes(len(data))
        elif mode == "truncated":
            data = data[: len(data) * 2 // 5]
        total = len(data)
        start, end = 0, total - 1
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        status = 200
        if rng and (rng.group(1) or rng.group(2)):
            if rng.group(1):
                start = int(rng.group(1))
                end = min(int(rng.group(2)), total - 1) if rng.group(2) else total - 1
            else:
                start = max(0, total - int(rng.group(2)))
            if start >= total:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        ctype = {".mp4": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska"}
        self.send_header("Content-Type", ctype.get(path.suffix, "application/octet-stream"))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
        self.end_headers()
        if not body:
            return
        chunk = data[start : end + 1]
        try:
            if mode == "stall":
                # Half the bytes, then silence with the connection open: only a read timeout ends it.
                self.wfile.write(chunk[: len(chunk) // 2])
                self.wfile.flush()
                srv.stop_event.wait(srv.stall_s)
                return
            if mode == "trickle":
                # Bytes keep coming, slowly: no read timeout ever fires (only a bound on the clip can).
                step = max(1, srv.trickle_bps // 4)
                for i in range(0, len(chunk), step):
                    self.wfile.write(chunk[i : i + step])
                    self.wfile.flush()
                    if srv.stop_event.wait(0.25):
                        return
                return
            self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    media: MediaServer

    def handle_error(self, request: object, client_address: object) -> None:
        """ffmpeg drops connections once it has read what it needs: not worth a traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class MediaServer:
    """Serve ``root`` on 127.0.0.1 (a free port), threaded, with per-file fault modes.

    Use as a context manager. ``url_template`` is the download stage's ``url_template`` for files
    named ``<youtube_id><suffix>``.
    """

    def __init__(self, root: Path, stall_s: float = 120.0, trickle_bps: int = 1024) -> None:
        self.root = Path(root)
        self.faults: dict[str, Fault] = {}
        self.hits: dict[str, int] = {}
        self.cookies: dict[str, list[str]] = {}  # Cookie headers received, per file
        # (time.time(), file name, what was served: "file" or the fault mode) per media request.
        self.requests: list[tuple[float, str, str]] = []
        self.wave: tuple[str, float, float | None] | None = None  # (mode, seconds, started at)
        self.wave_served = 0
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.stall_s = stall_s
        self.trickle_bps = trickle_bps
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MediaServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.media = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="media-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> MediaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    def url_template(self, suffix: str = ".mp4") -> str:
        return f"http://127.0.0.1:{self.port}/{{id}}{suffix}"

    def set_fault(self, name: str, mode: str, times: int | None = None) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault mode {mode!r} (known: {', '.join(FAULTS)})")
        with self.lock:
            self.faults[name] = Fault(mode, times)

    def start_wave(self, mode: str, seconds: float) -> None:
        """Answer every media request with fault ``mode`` for ``seconds``, counted from the first
        request that meets the wave (a bot-check wave: YouTube refusing one address for a while)."""
        if mode not in FAULTS:
            raise ValueError(f"unknown fault mode {mode!r} (known: {', '.join(FAULTS)})")
        with self.lock:
            self.wave = (mode, seconds, None)
            self.wave_served = 0

    def first_requests(self) -> dict[str, float]:
        """The time of the first request for each file (a download's start, as the server saw it)."""
        first: dict[str, float] = {}
        with self.lock:
            for t, name, _ in self.requests:
                first.setdefault(name, t)
        return first


def make_sources(
    folder: Path, clips: list[tuple[str, int]], extra_s: int = 2, name: str = "{youtube_id}.mp4"
) -> None:
    """Generate one source video per ``(youtube_id, start_s)`` in ``folder`` as ``name``
    (``<id>.mp4``; ``Y{youtube_id}.mp4`` is AudioSet's naming), long enough to hold the clip's
    10-s section (``start_s + 10 + extra_s`` seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)

    def one(clip: tuple[str, int]) -> None:
        yt, start = clip
        dest = folder / name.format(youtube_id=yt)
        if not dest.exists():
            tmp = make_clip(folder / f".tmp-{yt}", start + 10 + extra_s)
            os.replace(tmp, dest)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        list(pool.map(one, clips))


def main(argv: list[str] | None = None) -> int:
    """``python -m standins.media --config manifests/demo.yaml``: serve stand-in media for the
    clips of a run folder's clip table (stage 0 must have run) until interrupted, and print the
    ``--set`` that points stage 1 at it."""
    import argparse
    import time

    import pandas as pd

    from pipeline.cli import load_context

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", type=Path, default=Path("manifests/demo.yaml"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = load_context(args.config, args.workdir, ()).workdir
    ledger = workdir / "00-manifest" / "ledger"
    if not ledger.exists():
        print(f"no clip table in {workdir}: run stage 0 first (make stage-0 CONFIG={args.config})")
        return 2
    clips = pd.read_parquet(ledger, columns=["youtube_id", "start_s"])
    root = workdir / "standin-media"
    make_sources(root, [(str(r.youtube_id), int(r.start_s)) for r in clips.itertuples()])
    with MediaServer(root) as server:
        print(f"serving {len(clips)} stand-in sources from {root}; stop with Ctrl-C. In another shell:")
        url = server.url_template()
        where = f"CONFIG={args.config}" + (f" WORKDIR={args.workdir}" if args.workdir else "")
        print(f'  make stage-1 {where} ARGS="--set download.url_template={url}"')
        print(f"  make stage-2 {where}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
