"""A yt-dlp plugin: the stand-in for yt-dlp's YouTube extractor on the media server's watch pages.

youtube.com cannot be reached here. The media server's watch-page faults (``standins/media.py``:
``private``, ``bot_check``, ``formats_missing``) redirect a media URL to ``/watch?v=<id>``, a page
whose player response refuses the video as YouTube's does, or offers it with a JavaScript
challenge left unsolved; this extractor reads that response and does what yt-dlp's YouTube
extractor does with it (``raise_no_formats(reason, expected=True)`` with YouTube's own words; or
the "nsig extraction failed" warning and only the storyboard format), so stage 1 receives the
real ``DownloadError`` yt-dlp raises. yt-dlp loads it only from a folder on
``sys.path`` (``standins.media.YTDLP_PLUGINS``), which only tests put there.
"""

from __future__ import annotations

from typing import Any

from yt_dlp.extractor.common import InfoExtractor
from yt_dlp.utils import ExtractorError, traverse_obj


class AvcapsWatchPageIE(InfoExtractor):
    IE_NAME = "avcaps:watch-page"
    IE_DESC = False  # test stand-in: not listed
    _VALID_URL = r"https?://127\.0\.0\.1:\d+/watch\?v=(?P<id>[\w-]{11})"

    def _real_extract(self, url: str) -> dict[str, Any]:
        video_id = self._match_id(url)
        page = self._download_webpage(url, video_id)
        player = self._search_json(r"var\s+ytInitialPlayerResponse\s*=", page, "player response", video_id)
        status = player.get("playabilityStatus") or {}
        # As yt-dlp's YouTube extractor words it: the reason, then the subreason and login hint.
        screen = ("errorScreen", "playerErrorMessageRenderer")
        reason = traverse_obj(status, (*screen, "reason", "simpleText")) or status.get("reason") or ""
        subreason = traverse_obj(status, (*screen, "subreason", "simpleText"))
        if subreason and subreason != reason:
            reason += f". {subreason}"
        if "sign in" in reason.lower():
            reason += ". Use --cookies-from-browser or --cookies for the authentication"
        if status.get("status") != "OK" and reason:
            self.raise_no_formats(reason, expected=True)
        if player.get("challenge") == "unsolved":
            # A playable video whose n challenge was not solved (no JS runtime, an outdated
            # yt-dlp): yt-dlp's YouTube extractor warns as below and keeps only what needs no
            # challenge, the storyboard images; its format selection then finds nothing to fetch.
            self.report_warning("nsig extraction failed: Some formats may be missing", video_id)
            storyboard = {"format_id": "sb0", "url": url, "ext": "mhtml", "vcodec": "none", "acodec": "none"}
            return {"id": video_id, "title": video_id, "formats": [storyboard]}
        raise ExtractorError("the stand-in watch page only refuses videos", expected=True)
