"""Stage 2: keyframes (JPEG) and 16 kHz mono audio (exactly the clip length) from each clip.

Everything is decoded in-process with PyAV, one open file per clip (no ffmpeg process per frame:
spawning one costs ~80 ms by itself, see BENCHMARKS.md): the audio track first, then each frame
by a seek to the keyframe before it (stage 1 forces one every second). By default one frame is
taken at the clip's middle (the frame LAVCap-style models see); ``keyframes.frames: N`` takes N
uniformly spaced frames at ``(k + 0.5) * D / N``. A frame "at t" is the one on screen at t (the
last frame starting at or before t). The audio is downmixed, resampled to 16 kHz with soxr,
cut to exactly ``sample_rate * clip length`` samples, and a short source is padded with silence
at the end, which is recorded.

Quality flags are recorded, never used to drop a clip: a black or flat (near-constant) frame,
silent audio (dBFS under a threshold), a padded duration.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.errors import ItemError, PermanentError
from pipeline.fingerprint import DIGEST_KEY
from pipeline.io import atomic_path, file_digest
from pipeline.stage import Item, ItemStage, Result
from stages.audio import resample

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


class KeyframesConfig(StageConfig):
    batch_size: int = Field(32, gt=0, description="Clips per process() call (and per ledger commit).")
    frames: int = Field(1, gt=0, description="Frames per clip: 1 = the middle frame; N = N uniform frames.")
    frame_max_side: int | None = Field(
        384, gt=0, description="Downscale so the longer side is at most this (null: keep the size)."
    )
    jpeg_quality: int = Field(90, ge=1, le=95, description="JPEG quality of the keyframes.")
    sample_rate: int = Field(16000, gt=0, description="Audio sample rate (mono).")
    audio_format: Literal["flac", "wav"] = Field("flac", description="Audio container (16-bit PCM).")
    black_luma: float = Field(16.0, ge=0, description="A frame with mean luma below this is black.")
    flat_std: float = Field(4.0, ge=0, description="A frame with luma std below this is flat.")
    silent_dbfs: float = Field(-60.0, description="Audio under this RMS level (dBFS) is silent.")
    workers: int = Field(2, gt=0, description="Clips decoded at once (threads; PyAV releases the GIL).")


def middle_index(n_frames: int, middle: Any) -> int | None:
    """Which of a clip's ``n_frames`` keyframes is its middle one: this stage's ``middle_frame``
    when it names one of them, else the one in the middle of the list (rows without the column);
    None for a clip without frames. The one rule stages 3-6 pick the clip's frame by."""
    if n_frames <= 0:
        return None
    if isinstance(middle, int) and not isinstance(middle, bool) and 0 <= middle < n_frames:
        return middle
    return n_frames // 2


def frame_targets(duration_s: float, n: int) -> list[float]:
    """Target times (s from the clip start): the middle for n = 1, else ``(k + 0.5) * D / n``."""
    return [(k + 0.5) * duration_s / n for k in range(n)]


def dbfs(samples: np.ndarray) -> float:
    """RMS level of float samples in [-1, 1], in dBFS (-120 for digital silence)."""
    import numpy as np

    if samples.size == 0:
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return max(-120.0, 20.0 * math.log10(rms)) if rms > 0 else -120.0


def _frame_at(container: Any, vs: Any, target: float, v_first: float) -> tuple[float, Any]:
    """Seek to the keyframe at or before ``target`` and decode up to the frame on screen at it."""
    tb = vs.time_base
    rate = float(vs.average_rate or vs.guessed_rate or 25)
    container.seek(int((target + v_first) / tb), stream=vs, backward=True)
    best: tuple[float, Any] | None = None
    for frame in container.decode(vs):
        if frame.pts is None:
            continue
        t = float(frame.pts * tb) - v_first
        if best is not None and t > target + 1e-3:
            break
        best = (t, frame)
        if t + 1.0 / rate > target + 1e-3:
            break  # this frame is still on screen at the target: no need to decode the next one
    if best is None:
        raise PermanentError("no_frames", f"no decodable video frame near {target:.2f} s")
    return best


def decode_clip(
    path: Path, targets: list[float], sample_rate: int
) -> tuple[list[tuple[float, Any]], np.ndarray | None]:
    """The frames on screen at ``targets`` (time from the first frame, av.VideoFrame) and the
    audio as float32 mono at ``sample_rate`` (None when there is no audio stream).

    Each frame is reached by a seek to the keyframe before it (stage 1 puts one every second),
    so a middle frame costs a decode or two, not the 125 frames before it.
    """
    import av
    import numpy as np

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise PermanentError("no_video", f"{path}: no video stream")
        vs = container.streams.video[0]
        v_first = float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else 0.0
        # Audio first, from the start of the file as opened (no seek), then the frames by seeks.
        channels: list[list[np.ndarray]] = []
        a_first: float | None = None
        has_audio = bool(container.streams.audio)
        if has_audio:
            aus = container.streams.audio[0]
            rate = aus.codec_context.sample_rate
            for packet in container.demux(aus):
                for frame in packet.decode():
                    if a_first is None and frame.pts is not None and frame.time_base is not None:
                        a_first = float(frame.pts * frame.time_base)
                    rate = frame.sample_rate
                    if frame.format.name == "fltp":  # AAC, Opus, Vorbis: read the planes, no copies
                        n = frame.samples
                        # PyAV's planes are buffers (its stub does not say so): read without a copy.
                        chans = [np.frombuffer(p, np.float32, count=n) for p in frame.planes]  # type: ignore[call-overload]
                    else:
                        arr = frame.to_ndarray()
                        if not frame.format.is_planar:
                            arr = arr.reshape(-1, len(frame.layout.channels)).T
                        if arr.dtype.kind == "i":  # s16/s32 decoders: scale to [-1, 1]
                            arr = arr / float(np.iinfo(arr.dtype.name).max)
                        chans = list(arr.astype(np.float32, copy=False))
                    if not channels:
                        channels = [[] for _ in chans]
                    for store, c in zip(channels, chans, strict=False):
                        store.append(c)
        frames = [_frame_at(container, vs, t, v_first) for t in targets]
    if not has_audio:
        return frames, None
    if not channels:
        return frames, np.zeros(0, np.float32)
    mono = np.concatenate(channels[0])
    if len(channels) > 1:  # downmix: the mean of the channels
        for store in channels[1:]:
            mono += np.concatenate(store)
        mono /= len(channels)
    audio = resample(mono, rate, sample_rate)
    # Audio that starts later than the video is aligned by leading silence.
    lead = round(((a_first or 0.0) - v_first) * sample_rate)
    if lead > 0:
        audio = np.concatenate([np.zeros(lead, np.float32), audio])
    return frames, audio


class KeyframesStage(ItemStage[KeyframesConfig]):
    number = 2
    name = "keyframes"
    upstream = "download"
    description = "Extract keyframes (JPEG) and 16 kHz mono audio from each clip, with quality flags."

    def reads(self) -> tuple[str, ...]:
        # The clip's file (by its digest) and its length.
        return ("video_path", "start_s", "end_s", "video_duration_s")

    def fingerprint_settings(self) -> dict[str, Any]:
        cfg = self.cfg
        keys = ("frames", "frame_max_side", "jpeg_quality", "sample_rate", "audio_format", "black_luma")
        return {k: getattr(cfg, k) for k in (*keys, "flat_std", "silent_dbfs")}

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            # Later stages' fingerprints hash the files' contents (their digests), not their paths.
            pa.field("frame_paths", pa.list_(pa.string()), metadata={DIGEST_KEY: b"frame_digests"}),
            pa.field("frame_digests", pa.list_(pa.string())),  # sha256 of each JPEG written
            pa.field("frame_times_s", pa.list_(pa.float64())),
            pa.field("middle_frame", pa.int32()),
            pa.field("audio_path", pa.string(), metadata={DIGEST_KEY: b"audio_file_digest"}),
            pa.field("audio_file_digest", pa.string()),
            pa.field("audio_samples", pa.int64()),
            pa.field("audio_sample_rate", pa.int32()),
            pa.field("audio_padded_s", pa.float64()),
            pa.field("audio_dbfs", pa.float64()),
            pa.field("frame_luma_mean", pa.list_(pa.float64())),
            pa.field("frame_luma_std", pa.list_(pa.float64())),
            pa.field("flag_black_frame", pa.bool_()),
            pa.field("flag_flat_frame", pa.bool_()),
            pa.field("flag_silent", pa.bool_()),
            pa.field("flag_padded", pa.bool_()),
        ]

    def process(self, batch: list[Item]) -> list[Result]:
        if self.cfg.workers == 1 or len(batch) == 1:
            return [self._one(item) for item in batch]
        with ThreadPoolExecutor(max_workers=min(self.cfg.workers, len(batch))) as pool:
            return list(pool.map(self._one, batch))

    def _one(self, item: Item) -> Result:
        try:
            return Result.ok(item.clip_id, **self.extract(item))
        except ItemError as exc:
            return Result.failed(item.clip_id, exc)

    def extract(self, item: Item) -> dict[str, Any]:
        """Write one clip's frames and audio (atomically) and return its output columns."""
        import av
        import numpy as np
        import soundfile as sf

        cfg = self.cfg
        workdir = self.ctx.workdir
        video = workdir / item["video_path"]
        if not video.is_file():
            raise PermanentError("missing_video", f"{item['video_path']} is not in {workdir}")
        clip_s = float(item["end_s"]) - float(item["start_s"])
        duration = min(clip_s, float(item.data.get("video_duration_s") or clip_s))
        targets = frame_targets(duration, cfg.frames)
        try:
            frames, audio = decode_clip(video, targets, cfg.sample_rate)
        except ItemError:
            raise
        except av.error.FFmpegError as exc:
            raise PermanentError("corrupt_video", f"{item['video_path']}: {exc}") from exc
        if audio is None:
            raise PermanentError("no_audio", f"{item['video_path']}: no audio stream")

        frame_dir = self.ctx.media_dir / "frames" / item.clip_id
        paths, times, means, stds, digests = [], [], [], [], []
        for k, (t, frame) in enumerate(frames):
            w, h = frame.width, frame.height
            if cfg.frame_max_side and max(w, h) > cfg.frame_max_side:
                scale = cfg.frame_max_side / max(w, h)
                w, h = max(1, round(w * scale)), max(1, round(h * scale))
            # One swscale call converts and downsizes (cheaper than a full-size RGB image + PIL).
            img = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_image()
            luma = np.asarray(img.convert("L"), dtype=np.float32)
            means.append(round(float(luma.mean()), 2))
            stds.append(round(float(luma.std()), 2))
            dest = frame_dir / f"{k}.jpg"
            with atomic_path(dest, self.ctx.tmp_dir) as tmp:
                img.save(tmp, "JPEG", quality=cfg.jpeg_quality)
                digests.append("sha256:" + file_digest(tmp))
            paths.append(dest.relative_to(workdir).as_posix())
            times.append(round(t, 4))
        # Frames of an earlier run with more frames per clip would look like ours: remove them.
        keep = {Path(p).name for p in paths}
        for old in frame_dir.glob("*.jpg"):
            if old.name not in keep:
                old.unlink(missing_ok=True)

        want = round(cfg.sample_rate * clip_s)
        have = min(len(audio), want)
        level = dbfs(audio[:have])
        out = np.zeros(want, np.float32)
        out[:have] = audio[:have]
        audio_dest = self.ctx.media_dir / "audio" / f"{item.clip_id}.{cfg.audio_format}"
        with atomic_path(audio_dest, self.ctx.tmp_dir) as tmp:
            sf.write(tmp, out, cfg.sample_rate, subtype="PCM_16", format=cfg.audio_format.upper())
            audio_digest = "sha256:" + file_digest(tmp)
        padded = (want - have) / cfg.sample_rate
        middle = min(range(len(times)), key=lambda i: abs(times[i] - clip_s / 2))
        return {
            "frame_paths": paths,
            "frame_digests": digests,
            "frame_times_s": times,
            "middle_frame": middle,
            "audio_path": audio_dest.relative_to(workdir).as_posix(),
            "audio_file_digest": audio_digest,
            "audio_samples": want,
            "audio_sample_rate": cfg.sample_rate,
            "audio_padded_s": round(padded, 4),
            "audio_dbfs": round(level, 2),
            "frame_luma_mean": means,
            "frame_luma_std": stds,
            "flag_black_frame": any(m < cfg.black_luma for m in means),
            "flag_flat_frame": any(s < cfg.flat_std for s in stds),
            "flag_silent": level < cfg.silent_dbfs,
            "flag_padded": padded > 0,
        }

    def extra_stats(self, state: Any) -> dict[str, Any]:
        """How many clips carry each quality flag, and the total padding."""
        ok = state[state["status"] == "ok"] if "status" in state else state
        if ok.empty:
            return {"flags": {}}
        flags = ("flag_black_frame", "flag_flat_frame", "flag_silent", "flag_padded")
        return {
            "flags": {f: int(ok[f].fillna(False).astype(bool).sum()) for f in flags if f in ok},
            "audio_padded_s_total": round(float(ok["audio_padded_s"].fillna(0).sum()), 3),
        }
