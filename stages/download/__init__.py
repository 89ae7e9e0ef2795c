"""Stage 1, download: each clip's 10-s section from YouTube with yt-dlp, validated by decoding.
Reads the clip table (``youtube_id``, ``start_s``, ``end_s``); writes
``media/video/<2 hex>/<clip_id>.mp4`` and ``01-download/`` (video path, durations, size; or the
failure's class: the availability report; ``limits/<host>.json``: the pace and breaker state).
"""
