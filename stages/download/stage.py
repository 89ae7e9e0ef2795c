"""Stage 1: take each clip's 10-s section from its sources, and validate it by decoding.

The sources (``download.sources``; none: YouTube only) are tried in order per clip, and the first
that gives a valid picture gives the clip (:meth:`DownloadStage._take`); its sound is an
audio-only source's listed before it, else its own, else a later audio-only source's. A local
source (a folder, tar shards, a dataset) is found through its index (:mod:`stages.download.index`)
and read, cut and placed by :mod:`stages.download.local`; the youtube source downloads the section
with yt-dlp (:mod:`stages.download.youtube`), each start through the start gate of
:mod:`stages.download.limits` (an even pace shared by every process and Ray worker, and a circuit
breaker that stops the run, exit 4, when the source keeps refusing this address).

yt-dlp can report success on an empty, stream-less or truncated file, so every file is decoded
with PyAV before it counts (:mod:`stages.download.media`: both streams present, duration within
tolerance of 10 s or of the source's end), then placed where :mod:`stages.download.layout` says.
A valid file a killed run left in place is kept (``reuse_existing``). Failures are classified
(:mod:`stages.download.failures`) into permanent reasons (``private``, ``removed``,
``copyright``, ``http_404``...) that are never retried, and transient ones (``http_429``,
``bot_check``, ``timeout``...) that the runner retries with backoff. The stage's statistics are
the availability report (:mod:`stages.download.availability`) and the breaker's record.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError, PermanentError, RunThrottled, TransientError
from pipeline.fingerprint import DIGEST_KEY
from pipeline.io import atomic_path, file_digest
from pipeline.machine import machine_cause
from pipeline.selection import upstream_ok
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.download.availability import availability_report, sources_note
from stages.download.config import DownloadConfig
from stages.download.index import iter_local, open_index, wanted_keys
from stages.download.layout import VIDEO_SUFFIXES, existing_videos, video_path
from stages.download.limits import GateCancelled, breaker_summary
from stages.download.local import LocalMedia, Taken
from stages.download.media import decode_media
from stages.download.sources import YoutubeSource, check_sources, source_pattern
from stages.download.youtube import QuietLogger, YoutubeFetcher, with_warnings

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd
    import pyarrow as pa

    #: Given whether a download has its own sound: the sound to use instead (None: its own).
    AudioFor = Callable[[bool], Taken | None]


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
            # The file's content (its digest) is what later stages' fingerprints hash, not its path.
            pa.field("video_path", pa.string(), metadata={DIGEST_KEY: b"video_file_digest"}),
            pa.field("video_file_digest", pa.string()),  # sha256 of the placed file
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

    def reads(self) -> tuple[str, ...]:
        # The clip: which video and which 10 s of it (where a copy is found is not part of it).
        return ("youtube_id", "start_s", "end_s")

    def carries(self) -> tuple[str, ...]:
        return ("audiocap_ids",)  # sources named by audiocap id find the clip by them

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
        self._yt: YoutubeFetcher | None = None
        if self._youtube:  # after the local sources: a bad one stops the run before yt-dlp loads
            templates = [self._template(s) for s in self._youtube]
            self._yt = YoutubeFetcher(cfg, templates, self.folder / "limits", self.ctx.tmp_dir)
        (self.ctx.media_dir / "video").mkdir(parents=True, exist_ok=True)
        self.ctx.tmp_dir.mkdir(parents=True, exist_ok=True)

    def _template(self, src: YoutubeSource) -> str:
        return src.url_template or self.cfg.url_template

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
                if not isinstance(exc, Exception) and self._yt is not None:
                    # Ctrl-C / SIGTERM: clips waiting for a start (possibly a long cool-down) give
                    # up at once; downloads in flight end by themselves (each is bounded). An
                    # ordinary exception leaves the gate open: the runner redoes the batch item
                    # by item. Local sources alone have no gate.
                    self._yt.gate.cancel()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        done = [r for r in out if r is not None]
        if stops:
            raise RunThrottled(str(stops[0]), results=done)
        return done

    def _one(self, item: Item) -> Result:
        logger = QuietLogger()
        try:
            outputs = self.download(item, logger)
        except ItemError as exc:
            exc.message = with_warnings(exc.message, logger.warnings)
            return Result.failed(item.clip_id, exc)
        notes = outputs.pop("_notes", [])
        message = with_warnings("; ".join(f"taken after {n}" for n in notes), logger.warnings)
        return Result(item.clip_id, "ok", outputs, "", message)

    def download(self, item: Item, logger: QuietLogger | None = None) -> dict[str, Any]:
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

        return self._take(item, logger or QuietLogger())

    def _take(self, item: Item, logger: QuietLogger) -> dict[str, Any]:
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
        sound: Taken | None = (audio if audio is not None else video) if info.get("has_audio") else None
        digest = video.digest() if video.url is None else None
        return {
            "video_path": dest.relative_to(self.ctx.workdir).as_posix(),
            "video_file_digest": "sha256:" + file_digest(dest),
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
        self, item: Item, url: str, label: str, logger: QuietLogger, audio_for: AudioFor | None = None
    ) -> dict[str, Any]:
        """Download the clip's section from ``url`` with yt-dlp, check it and place it."""

        def place(file: Path, expected_s: float, src_dur: float | None) -> dict[str, Any]:
            dest = video_path(self.ctx.media_dir, item.clip_id, file.suffix)
            return self._validate_and_place(file, dest, url, expected_s, src_dur, label, audio_for)

        start, end = float(item["start_s"]), float(item["end_s"])
        assert self._yt is not None  # set up with the youtube source this is called for
        return self._yt.fetch(item.clip_id, start, end, url, logger, place)

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
