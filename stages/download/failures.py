"""Stage 1's failure classes: a yt-dlp (or network) exception -> a permanent or transient reason.

yt-dlp wraps the cause (``exc_info``, ``cause``, ``__cause__``); :func:`classify` walks the whole
chain and reads YouTube's own message texts, so a removed video is never retried and a throttled
one always is. The reasons are listed in the README ("Downloading real AudioCaps").
"""

from __future__ import annotations

from pipeline.errors import ItemError, PermanentError, TransientError

EXTRACTOR_NEEDLES = (
    "requested format is not available",
    "signature extraction failed",
    "nsig extraction failed",
    "some formats may be missing",
)
UPGRADE_HINT = (
    "yt-dlp could not read the player: upgrade it (pip install -U 'yt-dlp[default]') and check that "
    "`yt-dlp -v` lists a JS runtime"
)

# (reason, transient?, lower-case substrings). Order matters: rate-limit texts first, because
# YouTube's "Video unavailable. This content isn't available, try again later." contains
# "video unavailable"; apostrophes are normalized (real messages use a curly one).
TEXT_RULES: list[tuple[str, bool, tuple[str, ...]]] = [
    ("bot_check", True, ("not a bot", "confirm you're not", "unusual traffic")),
    ("rate_limited", True, ("try again later", "rate-limit", "rate limit")),
    ("account_terminated", False, ("account associated with this video has been terminated",)),
    ("copyright", False, ("copyright",)),
    ("private", False, ("private video", "this video is private", "video is private")),
    ("age_restricted", False, ("confirm your age", "age-restricted", "inappropriate for some users")),
    ("members_only", False, ("members-only", "members only", "join this channel")),
    ("geo_blocked", False, ("not available in your country", "not available from your location")),
    ("removed", False, ("removed by the uploader", "has been removed", "violating youtube")),
    ("live_or_premiere", True, ("live event will begin", "premieres in", "premiere will begin")),
    # yt-dlp could not read YouTube's player (an outdated yt-dlp, no JS runtime): the video may be
    # fine. Before "unavailable", whose "not available" would catch the first one.
    ("extractor_error", True, EXTRACTOR_NEEDLES),
    ("unavailable", False, ("video unavailable", "video is unavailable", "not available")),
    ("unsupported", False, ("unsupported url",)),
    ("timeout", True, ("timed out", "timeout")),
    ("connection", True, ("connection refused", "connection reset", "remote end closed", "unreachable")),
]


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: yt-dlp's ``exc_info[1]``, ``.cause``, ``__cause__``/``__context__``."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        info = getattr(e, "exc_info", None)
        if isinstance(info, tuple) and len(info) > 1 and isinstance(info[1], BaseException):
            todo.append(info[1])
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            todo.append(cause)
        todo += [e.__cause__, e.__context__]
    return seen


def _http_status(exc: BaseException) -> int | None:
    from yt_dlp.networking.exceptions import HTTPError

    for e in _causes(exc):
        if isinstance(e, HTTPError):
            return int(e.status)
        status = getattr(e, "code", None)
        if type(e).__name__ == "HTTPError" and isinstance(status, int):  # urllib's
            return status
    return None


def classify(exc: BaseException) -> ItemError:
    """Map a yt-dlp (or network) exception to a permanent or transient item error."""
    from yt_dlp.networking.exceptions import TransportError
    from yt_dlp.utils import GeoRestrictedError, UnsupportedError

    causes = _causes(exc)
    text = " | ".join(str(e) for e in causes).replace("’", "'").replace("‘", "'")
    low = text.lower()
    message = str(exc).removeprefix("ERROR: ")[:500]

    # Rate limiting and bot checks first: their texts can contain "Video unavailable".
    for reason, _transient, needles in TEXT_RULES[:2]:
        if any(n in low for n in needles):
            return TransientError(reason, message)
    status = _http_status(exc)
    if status is not None:
        if status == 429 or status == 408 or status >= 500 or status == 403:
            # 403 from YouTube's media hosts is usually an expired URL or throttling.
            return TransientError(f"http_{status}", message)
        return PermanentError(f"http_{status}", message)
    if any(isinstance(e, GeoRestrictedError) for e in causes):
        return PermanentError("geo_blocked", message)
    if any(isinstance(e, UnsupportedError) for e in causes):
        return PermanentError("unsupported", message)
    for reason, transient, needles in TEXT_RULES[2:]:
        if any(n in low for n in needles):
            if reason == "extractor_error":
                message = f"{UPGRADE_HINT}: {message}"
            return (TransientError if transient else PermanentError)(reason, message)
    if any(isinstance(e, (TransportError, TimeoutError, ConnectionError)) for e in causes):
        return TransientError("connection", message)
    return TransientError("download_error", message)
