"""Cut a clip out of local media in-process with PyAV, into the file the YouTube path writes.

A full-length video (a lab's AudioSet copy) is cut to [start, start + 10 s) here; a pre-cut clip
given its sound by another source (an audio-only mirror) is rebuilt the same way. The output is
what yt-dlp + ffmpeg write for a download: H.264 (x264, ``encode_preset``) at most ``max_height``
pixels high (aspect kept, even sizes, as ffmpeg's ``scale=-2:'min(ih,H)'``), a keyframe forced
every ``keyframe_interval_s`` (what ``-force_key_frames expr:gte(t,n_forced*I)`` does, so stage 2
seeks straight to its frames), AAC audio, MP4. Stage 2 and everything after it see one kind of
file whatever the source.

In-process because the input may be bytes (a tar member read by offset, a dataset cell) and one
ffmpeg process per clip costs a spawn and a container probe of its own (BENCHMARKS.md compares
the two). The frame on screen at ``start`` becomes the clip's first frame, at time 0.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import av.container

# Output timestamps in milliseconds: fine enough for any frame rate a source has.
_TB = Fraction(1, 1000)
AUDIO_RATE_MAX = 48000


@dataclass(frozen=True)
class Input:
    """A media input: a file, or bytes held in memory; ``start_s``: where the clip starts in it."""

    media: Path | bytes
    start_s: float = 0.0

    def open(self) -> av.container.InputContainer:
        import av

        src: Any = io.BytesIO(self.media) if isinstance(self.media, bytes) else str(self.media)
        return av.open(src)


@dataclass(frozen=True)
class Encoding:
    max_height: int
    keyframe_interval_s: float
    preset: str


def out_size(width: int, height: int, max_height: int) -> tuple[int, int]:
    """``scale=-2:'min(ih,H)'``: the height capped, the width following the aspect, both even."""
    h = min(height, max_height)
    h -= h % 2
    w = max(2, round(width * h / height / 2) * 2)
    return w, max(2, h)


def _origin(stream: Any) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def cut(video: Input, duration_s: float, dest: Path, enc: Encoding, audio: Input | None = None) -> None:
    """Write ``dest`` (MP4): the picture of ``video`` from ``video.start_s`` for ``duration_s``
    seconds (or to its end), and the sound of ``audio`` from ``audio.start_s`` (``None``: the
    video's own sound, if it has one). Raises PyAV's errors for media it cannot read."""
    import av

    inp = video.open()
    try:
        ainp = audio.open() if audio is not None else None
        try:
            out = av.open(str(dest), "w", format="mp4")
            try:
                _cut(
                    inp, video.start_s, ainp, audio.start_s if audio else video.start_s, duration_s, out, enc
                )
            finally:
                out.close()
        finally:
            if ainp is not None:
                ainp.close()
    finally:
        inp.close()


def _cut(inp: Any, start: float, ainp: Any, astart: float, duration: float, out: Any, enc: Encoding) -> None:
    vs = inp.streams.video[0]
    vs.thread_type = "AUTO"
    rate = vs.average_rate or vs.guessed_rate or Fraction(25)
    w, h = out_size(vs.codec_context.width, vs.codec_context.height, enc.max_height)
    ovs = out.add_stream("libx264", rate=rate)
    ovs.width, ovs.height, ovs.pix_fmt = w, h, "yuv420p"
    ovs.codec_context.time_base = _TB
    # Keyframes only where forced (and at x264's scene cuts): a GOP as long as the clip.
    ovs.codec_context.gop_size = max(1, int(float(rate) * duration) + 1)
    ovs.options = {"preset": enc.preset}
    video = _VideoCut(ovs, start, duration, _origin(vs), (w, h), enc.keyframe_interval_s)

    # The sound: the video's own stream, or another input's first audio stream.
    own = ainp is None
    asrc = inp if own else ainp
    astream = asrc.streams.audio[0] if asrc.streams.audio else None
    oas = None
    if astream is not None:
        arate = min(astream.codec_context.sample_rate or 44100, AUDIO_RATE_MAX)
        layout = "mono" if (astream.codec_context.channels or 1) == 1 else "stereo"
        oas = out.add_stream("aac", rate=arate, layout=layout)
    # The video's own sound keeps its place against the picture (both measured from the video's
    # first frame, as stage 2 aligns them); another input's sound starts at its own origin.
    audio = _AudioCut(oas, astart, duration, _origin(vs) if own else _origin(astream) if astream else 0.0)

    inp.seek(max(0, int((start + video.origin) / vs.time_base)), stream=vs, backward=True)
    streams = [vs, astream] if own and astream is not None else [vs]
    for packet in inp.demux(*streams):
        part = video if packet.stream is vs else audio
        if not part.done:
            for frame in packet.decode():
                part.feed(frame, out)
        if video.done and (audio.done or not own):
            break
    video.flush(out)
    if not own and astream is not None:
        if astart > 0:
            ainp.seek(max(0, int((astart + audio.origin) / astream.time_base)), stream=astream, backward=True)
        for packet in ainp.demux(astream):
            for frame in packet.decode():
                audio.feed(frame, out)
            if audio.done:
                break
    audio.flush(out)


class _VideoCut:
    """Frames of [start, start + duration), the one on screen at ``start`` first (at time 0),
    scaled and given forced keyframes, to the encoder."""

    def __init__(
        self, ovs: Any, start: float, duration: float, origin: float, size: tuple[int, int], interval: float
    ) -> None:
        self.ovs, self.start, self.end, self.origin = ovs, start, start + duration, origin
        self.size, self.interval = size, interval
        self.held: tuple[Any, float] | None = None  # the last frame starting at or before `start`
        self.forced = 0
        self.frames = 0
        self.done = False

    def feed(self, frame: Any, out: Any) -> None:
        if self.done or frame.pts is None:
            return
        t = float(frame.pts * frame.time_base) - self.origin
        if t <= self.start + 1e-6:
            self.held = (frame, t)
            return
        if t >= self.end - 1e-6:
            self.done = True
            return
        if self.held is not None:
            self._emit(*self.held, out)
            self.held = None
        self._emit(frame, t, out)

    def _emit(self, frame: Any, t: float, out: Any) -> None:
        from av.video.frame import PictureType

        rel = max(0.0, t - self.start)
        new = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
        new.pts = round(rel / _TB)
        new.time_base = _TB
        if rel + 1e-6 >= self.forced * self.interval:
            new.pict_type = PictureType.I
            while self.forced * self.interval <= rel + 1e-6:
                self.forced += 1
        for packet in self.ovs.encode(new):
            out.mux(packet)
        self.frames += 1

    def flush(self, out: Any) -> None:
        if self.held is not None:  # the source ends at the start: its last frame is the clip
            self._emit(*self.held, out)
            self.held = None
        for packet in self.ovs.encode(None):
            out.mux(packet)


class _AudioCut:
    """Feeds the decoded frames of [start, start + duration) of an audio stream to the AAC encoder,
    sample-exact: frames are cut at the start and at the end, timestamps start at 0."""

    def __init__(self, oas: Any, start: float, duration: float, origin: float) -> None:
        import av

        self.oas = oas
        self.start, self.end, self.origin = start, start + duration, origin
        self.done = oas is None
        self.written = 0  # samples sent to the encoder
        if oas is not None:
            rate = oas.codec_context.sample_rate
            self.rate = rate
            self.resampler = av.AudioResampler(format="fltp", layout=oas.codec_context.layout, rate=rate)

    def feed(self, frame: Any, out: Any) -> None:
        if self.done or frame.pts is None:
            return
        import av
        import numpy as np

        t0 = float(frame.pts * frame.time_base) - self.origin
        ctx = self.oas.codec_context
        if (
            frame.format.name == "fltp"
            and frame.sample_rate == self.rate
            and frame.layout.name == ctx.layout.name
        ):
            self._take(frame, t0, out, np, av)  # already what AAC takes (AAC, Opus sources): no copy
            return
        for res in self.resampler.resample(frame):
            self._take(res, t0, out, np, av)
            t0 += res.samples / self.rate

    def _take(self, res: Any, t0: float, out: Any, np: Any, av: Any) -> None:
        first = max(0, round((self.start - t0) * self.rate))
        total = round((self.end - self.start) * self.rate)
        # Place this frame's samples at their own time: a gap (or overlap) after the previous
        # frame is absorbed by where the next sample goes, not by a drift of the whole track.
        at = max(self.written, round((t0 - self.start) * self.rate) + first)
        n = min(res.samples - first, total - at)
        if n <= 0:
            if at >= total:
                self.done = True
            return
        if first == 0 and n == res.samples:
            new = res  # the whole frame is in the clip: re-timed, not copied
        else:
            arr = res.to_ndarray()[:, first : first + n]
            new = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format="fltp", layout=res.layout.name)
            new.sample_rate = self.rate
        new.pts = at
        new.time_base = Fraction(1, self.rate)
        for packet in self.oas.encode(new):
            out.mux(packet)
        self.written = at + n
        if self.written >= total:
            self.done = True

    def flush(self, out: Any) -> None:
        if self.oas is None:
            return
        for packet in self.oas.encode(None):
            out.mux(packet)
