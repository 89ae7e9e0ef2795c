"""Stage 1, download: each clip's 10-s section from the first of its sources, in the order listed,
that holds a valid copy (local media: a folder, tar shards, a dataset; YouTube, with yt-dlp),
validated by decoding. Reads the clip table (``youtube_id``, ``start_s``, ``end_s``;
``audiocap_ids`` to match local files; ``split`` for the report) and the local sources; writes
``media/video/<2 hex>/<clip_id>.<ext>`` and ``01-download/`` (video path, durations, size, where
picture and sound came from; or the failure's class: the availability report;
``limits/<host>.json``: the pace and breaker state; ``sources/<name>.parquet``: the local sources'
indexes).
"""
