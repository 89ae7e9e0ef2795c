"""Stage 2 on generated clips, through ``process()`` with items built to the column contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import Item, RunContext
from stages.config import RunConfig
from stages.keyframes import KeyframesStage, frame_targets
from standins.media import make_clip, second_for_level

# name -> (duration s, fps, tone Hz (0: silence))
CLIPS = {
    "tenseconds": (10, 10, 440.0),
    "fps25": (10, 25, 440.0),
    "short4s": (4, 10, 440.0),
    "silent": (10, 10, 0),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder whose media/video holds clips as stage 1 leaves them (cut, starting at 0)."""
    wd = tmp_path_factory.mktemp("run")
    for name, (dur, fps, tone) in CLIPS.items():
        make_clip(wd / "media" / "video" / name, dur, fps=fps, tone_hz=tone)
    (wd / "media" / "video" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(50_000))
    return wd


def item(name: str, duration: float | None = None) -> Item:
    dur = CLIPS[name][0] if name in CLIPS else 10
    return Item(
        name,
        {
            "video_path": f"media/video/{name}.mp4",
            "start_s": 0,
            "end_s": 10,
            "video_duration_s": duration or dur,
        },
    )


def stage(workdir: Path, **settings: object) -> KeyframesStage:
    cfg = RunConfig()
    cfg.keyframes = cfg.keyframes.model_copy(update=settings)
    return KeyframesStage(RunContext(workdir, cfg))


def frame_seconds(workdir: Path, paths: list[str]) -> list[int | None]:
    from PIL import Image

    return [second_for_level(np.asarray(Image.open(workdir / p).convert("L")).mean()) for p in paths]


@pytest.mark.parametrize("name", ["tenseconds", "fps25"])
@pytest.mark.parametrize("n", [1, 8])
def test_frames_at_the_right_times(workdir: Path, name: str, n: int) -> None:
    [res] = stage(workdir, frames=n).process([item(name)])
    assert res.status == "ok", res.message
    out = res.outputs
    fps = CLIPS[name][1]
    assert len(out["frame_paths"]) == len(out["frame_times_s"]) == n
    for target, t in zip(frame_targets(10.0, n), out["frame_times_s"], strict=True):
        assert target - 1.0 / fps - 1e-3 <= t <= target + 1e-3  # the frame on screen at the target
    # The picture's level says which second each frame comes from.
    assert frame_seconds(workdir, out["frame_paths"]) == [int(t + 1e-3) % 12 for t in out["frame_times_s"]]
    times = out["frame_times_s"]
    assert abs(times[out["middle_frame"]] - 5.0) == min(abs(t - 5.0) for t in times)
    if n == 1:
        assert out["frame_times_s"] == [5.0] and frame_seconds(workdir, out["frame_paths"]) == [5]
    # Level 15 (second 0) is under the black threshold: only the 8-frame run sees it (t = 0.625 s).
    assert out["flag_black_frame"] is (n == 8)


@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_audio_is_exactly_160000_samples(workdir: Path, fmt: str) -> None:
    import soundfile as sf

    [res] = stage(workdir, audio_format=fmt).process([item("tenseconds")])
    out = res.outputs
    assert out["audio_path"] == f"media/audio/tenseconds.{fmt}"
    audio, sr = sf.read(workdir / out["audio_path"])
    assert (sr, audio.ndim, len(audio), out["audio_samples"]) == (16000, 1, 160_000, 160_000)
    assert out["audio_padded_s"] == 0.0 and not out["flag_padded"] and not out["flag_silent"]
    assert out["audio_dbfs"] == pytest.approx(-21.0, abs=1.0)  # ffmpeg's sine: amplitude 1/8, RMS -21 dBFS
    # A 440 Hz tone resampled to 16 kHz is still a 440 Hz tone.
    spectrum = np.abs(np.fft.rfft(audio[:16000]))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1


def test_short_clip_is_padded_with_silence(workdir: Path) -> None:
    import soundfile as sf

    [res] = stage(workdir, frames=4).process([item("short4s")])
    out = res.outputs
    audio, _ = sf.read(workdir / out["audio_path"])
    assert len(audio) == 160_000 and out["flag_padded"]
    assert out["audio_padded_s"] == pytest.approx(6.0, abs=0.05)
    assert np.abs(audio[4 * 16000 + 800 :]).max() == 0.0 and np.abs(audio[: 3 * 16000]).max() > 0.05
    assert max(out["frame_times_s"]) <= 4.0  # frames spread over the 4 s that exist


def test_silent_flag_and_frame_size(workdir: Path) -> None:
    from PIL import Image

    [res] = stage(workdir, frame_max_side=48, jpeg_quality=60).process([item("silent")])
    out = res.outputs
    assert out["flag_silent"] and out["audio_dbfs"] <= -100
    assert max(Image.open(workdir / out["frame_paths"][0]).size) == 48


def test_bad_clips_fail_alone(workdir: Path) -> None:
    results = stage(workdir).process([item("garbage"), item("missing"), item("tenseconds")])
    by_id = {r.clip_id: r for r in results}
    assert (by_id["garbage"].status, by_id["garbage"].reason) == ("failed_permanent", "corrupt_video")
    assert (by_id["missing"].status, by_id["missing"].reason) == ("failed_permanent", "missing_video")
    assert "media/video/missing.mp4" in by_id["missing"].message
    assert by_id["tenseconds"].status == "ok"
    assert not list(workdir.rglob(".tmp-*"))
