"""The failure classifier on real yt-dlp exception objects.

YouTube's own pages cannot be served here, so ``FakeYouTubePageIE`` (a fake, named as such) stands
in for yt-dlp's YouTube extractor: it raises what that extractor raises (``ExtractorError`` with
``expected=True`` through ``raise_no_formats``/``raise_login_required``, ``GeoRestrictedError``
through ``raise_geo_restricted``) carrying YouTube's own message texts, and a real ``YoutubeDL``
wraps them into the ``DownloadError`` the stage sees. HTTP statuses, timeouts and the other
transport failures are tested end to end against the local server in ``test_download.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cli import load_context
from pipeline.errors import PermanentError, TransientError
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.download.failures import classify
from stages.download.stage import DownloadStage
from stages.manifest import ManifestStage
from standins.media import MediaServer

from .conftest import START_S, MakeRun, add_source, avcaps, finish

LOGIN_HINT = "Use --cookies-from-browser or --cookies for the authentication"

# (YouTube's reason text as yt-dlp's YouTube extractor words it, how it is raised, reason, transient)
CASES: list[tuple[str, str, str, bool]] = [
    ("Private video. Sign in if you've been granted access to this video", "no_formats", "private", False),
    ("Video unavailable. This video has been removed by the uploader", "no_formats", "removed", False),
    (
        "Video unavailable. This video is no longer available because the YouTube account "
        "associated with this video has been terminated.",
        "no_formats",
        "account_terminated",
        False,
    ),
    (
        "Video unavailable. This video is no longer available due to a copyright claim by SME",
        "no_formats",
        "copyright",
        False,
    ),
    (
        "Video unavailable. This video contains content from SME, who has blocked it on copyright grounds",
        "no_formats",
        "copyright",
        False,
    ),
    (
        "This video has been removed for violating YouTube's Terms of Service",
        "no_formats",
        "removed",
        False,
    ),
    (
        "Sign in to confirm your age. This video may be inappropriate for some users",
        "login",
        "age_restricted",
        False,
    ),
    (
        "Join this channel to get access to members-only content like this video, and other exclusive perks.",
        "no_formats",
        "members_only",
        False,
    ),
    ("The uploader has not made this video available in your country", "geo", "geo_blocked", False),
    ("Video unavailable", "no_formats", "unavailable", False),
    ("This video is not available", "no_formats", "unavailable", False),
    # Rate limiting and bot checks: transient, and matched before "Video unavailable".
    ("Sign in to confirm you’re not a bot", "login", "bot_check", True),
    (
        "Video unavailable. This content isn’t available, try again later. The current session has been "
        "rate-limited by YouTube for up to an hour.",
        "no_formats",
        "rate_limited",
        True,
    ),
    ("This live event will begin in a few moments.", "no_formats", "live_or_premiere", True),
    # yt-dlp could not read the player (outdated, no JS runtime): the video may be fine. Before
    # "unavailable", whose "not available" would publish it as gone.
    ("Signature extraction failed: Some formats may be missing", "no_formats", "extractor_error", True),
    ("nsig extraction failed: Some formats may be missing", "no_formats", "extractor_error", True),
]


def download_error_for(text: str, how: str) -> Exception:
    """Run a real YoutubeDL on the fake extractor; return the exception it raises."""
    import yt_dlp
    from yt_dlp.extractor.common import InfoExtractor

    class FakeYouTubePageIE(InfoExtractor):
        """FAKE: stands in for youtube.com's watch page, which cannot be served here."""

        _VALID_URL = r"https?://fake-youtube\.invalid/watch\?v=(?P<id>[\w-]{11})"

        def _real_extract(self, url: str) -> dict[str, Any]:
            if how == "geo":
                self.raise_geo_restricted(text, countries=["US"])
            if how == "login":
                # yt-dlp's YouTube extractor appends its login hint to "Sign in" reasons.
                self.raise_no_formats(f"{text}. {LOGIN_HINT}", expected=True)
            self.raise_no_formats(text, expected=True)
            raise AssertionError("unreachable")

    class Quiet:
        def debug(self, msg: str) -> None: ...
        def info(self, msg: str) -> None: ...
        def warning(self, msg: str) -> None: ...
        def error(self, msg: str) -> None: ...

    with yt_dlp.YoutubeDL({"logger": Quiet(), "quiet": True}) as ydl:
        ydl.add_info_extractor(FakeYouTubePageIE())
        try:
            ydl.extract_info("https://fake-youtube.invalid/watch?v=abcdefghijk", ie_key="FakeYouTubePage")
        except Exception as exc:
            return exc
    raise AssertionError("the fake extractor did not raise")


@pytest.mark.parametrize(("text", "how", "reason", "transient"), CASES, ids=[c[2] for c in CASES])
def test_youtube_messages(text: str, how: str, reason: str, transient: bool) -> None:
    from yt_dlp.utils import DownloadError

    exc = download_error_for(text, how)
    assert isinstance(exc, DownloadError)  # what the stage really receives
    err = classify(exc)
    assert err.reason == reason, (text, err)
    assert isinstance(err, TransientError if transient else PermanentError)
    assert not err.message.startswith("ERROR:")
    assert text[:20] in err.message  # YouTube's own words reach the ledger's message column


def test_http_error_objects_by_status() -> None:
    """yt-dlp's HTTPError carries the status; 404/410 are permanent, 429/5xx transient."""
    from yt_dlp.networking import Response
    from yt_dlp.networking.exceptions import HTTPError
    from yt_dlp.utils import DownloadError, ExtractorError

    def wrapped(status: int) -> DownloadError:
        import io

        http = HTTPError(Response(io.BytesIO(b""), "http://x.invalid/", {}, status=status))
        try:
            raise ExtractorError("Unable to download webpage", cause=http)
        except ExtractorError as ee:
            import sys

            return DownloadError(f"ERROR: {ee}", sys.exc_info())

    assert classify(wrapped(404)).reason == "http_404"
    assert isinstance(classify(wrapped(410)), PermanentError)
    assert isinstance(classify(wrapped(429)), TransientError)
    assert classify(wrapped(503)).reason == "http_503"
    assert isinstance(classify(wrapped(503)), TransientError)


def test_requested_format_not_available_is_an_extractor_error() -> None:
    """yt-dlp's own format selection error (raised by YoutubeDL, not by an extractor) when what
    the extractor could read holds no format the stage asks for."""
    import yt_dlp
    from yt_dlp.extractor.common import InfoExtractor
    from yt_dlp.utils import DownloadError

    class FakeYouTubePageIE(InfoExtractor):
        """FAKE: stands in for youtube.com's watch page; offers only a storyboard, as the YouTube
        extractor does when it cannot solve the player's challenges."""

        _VALID_URL = r"https?://fake-youtube\.invalid/watch\?v=(?P<id>[\w-]{11})"

        def _real_extract(self, url: str) -> dict[str, Any]:
            sb = {"format_id": "sb0", "url": url, "ext": "mhtml", "vcodec": "none", "acodec": "none"}
            return {"id": self._match_id(url), "title": "x", "formats": [sb]}

    class Quiet:
        def debug(self, msg: str) -> None: ...
        def info(self, msg: str) -> None: ...
        def warning(self, msg: str) -> None: ...
        def error(self, msg: str) -> None: ...

    opts = {"logger": Quiet(), "quiet": True, "format": "bv*[height<=?360]+ba/b[height<=?360]/b"}
    with yt_dlp.YoutubeDL(opts) as ydl:
        ydl.add_info_extractor(FakeYouTubePageIE())
        with pytest.raises(DownloadError) as exc:
            ydl.extract_info("https://fake-youtube.invalid/watch?v=abcdefghijk", ie_key="FakeYouTubePage")
    assert "Requested format is not available" in str(exc.value)
    err = classify(exc.value)
    assert (err.reason, type(err)) == ("extractor_error", TransientError)
    assert err.message.startswith("yt-dlp could not read the player: upgrade it")
    assert "Requested format is not available" in err.message


@pytest.mark.slow
def test_missing_formats_reach_the_ledger_with_yt_dlps_warnings(
    media_root: Path, server: MediaServer, make_run: MakeRun
) -> None:
    """End to end: the server's watch page offers a video whose JavaScript challenge the
    extractor cannot solve; the clip fails transient extractor_error (not `unavailable`), and the
    ledger's message holds the upgrade hint and yt-dlp's warning."""
    yt = add_source(media_root, "nsigfailed1", "okh264clip1")
    server.set_fault(f"{yt}.mp4", "formats_missing")
    config = make_run([yt], download={"url_template": server.url_template(), "max_attempts": 1})
    ctx = load_context(config, None, ())
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    code, err = finish(avcaps(config, "run", "download", "--no-progress"))
    assert code == 0, err[-2000:]
    row = stage_ledger(DownloadStage(ctx)).latest().loc[f"{yt}_{START_S * 1000}_{(START_S + 10) * 1000}"]
    assert (row["status"], row["reason"]) == ("failed_transient", "extractor_error")
    assert "upgrade it (pip install -U 'yt-dlp[default]')" in row["message"]
    assert "Requested format is not available" in row["message"]
    warning = "[avcaps:watch-page] nsigfailed1: nsig extraction failed: Some formats may be missing"
    assert f"[yt-dlp warnings: {warning}" in row["message"]
