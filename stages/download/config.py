"""Stage 1's section of the run manifest (``download:``): the sources, the clip's cut and encoding,
the pace and breaker of the start gate, yt-dlp's timeouts, and the checks a file must pass."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.config import StageConfig
from stages.download.sources import Source


class DownloadConfig(StageConfig):
    batch_size: int = Field(8, gt=0, description="Clips per process() call (and per ledger commit).")
    sources: list[Source] = Field(
        [],
        description="Where clips come from, in order; per clip the first source holding a valid copy "
        "wins: folder, tar, hf (local media: README 'Using media you already have') and youtube "
        "(yt-dlp on url_template). Empty: YouTube only.",
    )
    max_attempts: int = Field(4, gt=0, description="Attempts for a clip failing transiently.")
    backoff_s: float = Field(30.0, ge=0, description="First retry delay; doubles per attempt.")
    url_template: str = Field(
        "https://www.youtube.com/watch?v={id}",
        description="Source URL of the youtube source; {id} is the YouTube id.",
    )
    max_height: int = Field(360, gt=0, description="Video height cap (BLIP-2 sees 224-384 px).")
    concurrency: int = Field(2, gt=0, description="Clips downloaded at once (threads) in a batch.")
    delay_s: float = Field(
        0.0,
        ge=0,
        description="Politeness: least seconds between two download starts on this host, shared by "
        "every process and Ray worker of the run folder.",
    )
    jitter_s: float = Field(0.0, ge=0, description="Random extra delay (0..jitter_s) per start.")
    max_per_hour: float | None = Field(
        None,
        gt=0,
        description="At most this many download starts per hour from this host (all processes of the "
        "run folder together), spaced evenly. YouTube blocks a guest session around 300/hour.",
    )
    clip_timeout_s: float = Field(
        180.0, gt=0, description="Wall-clock bound on one clip's download; past it: slow_transfer."
    )
    breaker_threshold: int = Field(
        5, gt=0, description="Rate-limit failures (bot_check, http_429, rate_limited) that trip the breaker"
    )
    breaker_window_s: float = Field(300.0, gt=0, description="... within this many seconds.")
    breaker_cooldown_s: float = Field(
        600.0, ge=0, description="First cool-down (no download starts); each next one is twice as long."
    )
    breaker_max_cooldowns: int = Field(
        3, gt=0, description="Cool-downs whose probe failed before the run stops (exit 4)."
    )
    require_js_runtime: bool | None = Field(
        None,
        description="Stop at setup unless yt-dlp finds a JavaScript runtime (YouTube needs one). "
        "Default: on for YouTube URLs.",
    )
    js_runtimes: list[str] = Field(
        ["deno"],
        description="yt-dlp's JavaScript runtimes, NAME or NAME:PATH (deno, node, bun, quickjs); deno "
        "comes with the pipeline (PyPI).",
    )
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
