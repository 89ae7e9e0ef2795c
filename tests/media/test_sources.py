"""Stage 1 from the media a team already has: folders, tar shards, a datasets folder, audio-only
files, and YouTube (the local media server) only for what no local source holds.

Every source is real: files generated with ffmpeg in a folder tree, uncompressed tar shards
written with ``tarfile``, a dataset written by ``datasets.save_to_disk``, WAVs. Stage 2 then runs
on what stage 1 placed, so a cut that lands on the wrong seconds or loses the sound shows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cli import load_context
from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from pipeline.status import format_table, run_status
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from standins.media import MediaServer, make_clip, second_for_level
from standins.sources import make_wav, write_hf_dataset, write_tar

from .conftest import add_source, avcaps, finish

pytestmark = pytest.mark.slow


def cid(yt: str, start: int) -> str:
    return f"{yt}_{start * 1000}_{(start + 10) * 1000}"


def write_run(
    tmp_path: Path, clips: list[tuple[str, int]], sources: list[dict[str, Any]], **download: Any
) -> Path:
    """A one-split manifest of ``clips`` (youtube id, start) and a run config with ``sources``."""
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    lines = ["audiocap_id,youtube_id,start_time,caption"]
    lines += [f"{100 + i},{yt},{start},a tone plays" for i, (yt, start) in enumerate(clips)]
    (csv_dir / "test.csv").write_text("\n".join(lines) + "\n")
    cfg = {
        "workdir": str(tmp_path / "run"),
        "manifest": {"csv_dir": str(csv_dir), "splits": {"test": "test.csv"}, "checksums": None},
        "download": {
            "sources": sources,
            "backoff_s": 0.05,
            "backoff_max_s": 0.2,
            "read_timeout_s": 2,
            "socket_timeout_s": 2,
            "max_attempts": 2,
            **download,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(config: Path, *stages: type, **options: Any) -> Any:
    ctx = load_context(config, None, ())
    for cls in stages:
        run_stage(cls, ctx, RunOptions(progress=False, **options))
    return ctx


def clip_bytes(dest: Path, seconds: float = 10, **kw: Any) -> bytes:
    return make_clip(dest, seconds, **kw).read_bytes()


def peak_hz(path: Path) -> float:
    """The loudest frequency of a stage-2 audio file (which tone the clip's sound is)."""
    import soundfile as sf

    audio, rate = sf.read(path)
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[int(np.argmax(spectrum))])


def none(value: Any) -> Any:
    return None if pd.isna(value) else value


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_levels(workdir: Path, row: Any, offset: int) -> None:
    """The frame on screen at t shows the gray level of second ``offset + floor(t)`` of the media
    the clip was cut from (pre-cut clips: offset 0)."""
    from PIL import Image

    for rel, t in zip(row["frame_paths"], row["frame_times_s"], strict=True):
        luma = np.asarray(Image.open(workdir / rel).convert("L"), dtype=np.float32).mean()
        assert second_for_level(luma) == (offset + int(t + 1e-3)) % 12, (rel, t, luma)


def test_every_kind_of_source(tmp_path: Path, media_root: Path, server: MediaServer) -> None:
    src = tmp_path / "sources"
    # A lab's full-length videos, AudioSet names (Y<id>.mp4), larger than the 360-p cap.
    for yt, seconds in (("fullvideo01", 30), ("fullvideo02", 12), ("audiofirst1", 20)):
        make_clip(src / "full" / "sub" / f"Y{yt}", seconds, size="640x480")
    # Pre-cut clips in two WebDataset shards (with a JSON member beside each, as WebDataset has).
    write_tar(src / "shards" / "part-000.tar", [
        (f"{cid('tarprecut01', 21)}.mp4", clip_bytes(tmp_path / "m" / "t1")),
        (f"{cid('tarprecut01', 21)}.json", b"{}"),
    ])  # fmt: skip
    write_tar(
        src / "shards" / "part-001.tar", [(f"{cid('tarprecut02', 5)}.mp4", clip_bytes(tmp_path / "m" / "t2"))]
    )
    # A dataset saved with `datasets`: the clip's bytes, identified by youtube id and start.
    # Cells as datasets stores media ({bytes, path}): the second row names a file (relative to the
    # dataset folder) instead of holding its bytes.
    hf_clip = clip_bytes(tmp_path / "m" / "h1")
    cells = [{"bytes": hf_clip, "path": None}, {"bytes": None, "path": "files/clip.mkv"}]
    write_hf_dataset(
        src / "hf-clips", {"ytid": ["hfprecut001", "hfpathclip1"], "start": [7, 8], "video": cells}
    )
    make_clip(src / "hf-clips" / "files" / "clip", 10, profile="mpeg4")
    # An audio mirror as a dataset (wav bytes), listed first: its sound wins over the video's own.
    wav880 = make_wav(tmp_path / "m" / "a880.wav", 10, tone_hz=880).read_bytes()
    write_hf_dataset(src / "hf-audio", {"ytid": ["audiofirst1"], "start": [4], "audio": [wav880]})
    # Video without sound, and a folder of wavs that has it.
    make_clip(src / "silent" / cid("silentvid01", 2), 10, audio=False)
    make_wav(src / "wavs" / f"{cid('silentvid01', 2)}.wav", 10, tone_hz=660)
    # A pre-cut clip to be hard-linked in.
    make_clip(src / "precut" / cid("linkprecut1", 0), 10)
    add_source(media_root, "youtubeonly", "okh264clip1")  # on "YouTube" only
    clips = [
        ("fullvideo01", 13), ("fullvideo02", 0), ("audiofirst1", 4), ("tarprecut01", 21), ("tarprecut02", 5),
        ("hfprecut001", 7), ("hfpathclip1", 8), ("silentvid01", 2), ("linkprecut1", 0), ("youtubeonly", 3),
        ("notanywhere", 3),
    ]  # fmt: skip
    sources = [
        {"kind": "hf", "name": "audio-mirror", "dataset": str(src / "hf-audio"), "media_column": "audio",
         "columns": {"youtube_id": "ytid", "start_time": "start"}, "streams": "audio"},
        {"kind": "folder", "name": "lab-full", "path": str(src / "full"), "pattern": "Y{youtube_id}.mp4"},
        {"kind": "tar", "path": str(src / "shards" / "part-{000..001}.tar"), "pattern": "{clip_id}.mp4"},
        {"kind": "hf", "name": "hf-clips", "dataset": str(src / "hf-clips"),
         "columns": {"youtube_id": "ytid", "start_time": "start"}},
        {"kind": "folder", "path": str(src / "silent"), "pattern": "{youtube_id}_{start_ms}_{end_ms}.*"},
        {"kind": "folder", "path": str(src / "precut"), "pattern": "{clip_id}.mp4", "place": "link"},
        {"kind": "folder", "path": str(src / "wavs"), "pattern": "{clip_id}.wav", "streams": "audio"},
        {"kind": "youtube", "url_template": server.url_template()},
    ]  # fmt: skip
    config = write_run(tmp_path, clips, sources)
    ctx = run(config, ManifestStage, DownloadStage, KeyframesStage)
    state = stage_ledger(DownloadStage(ctx)).latest()

    got = {
        c: (r["status"], r["reason"], none(r["video_source"]), none(r["audio_source"]))
        for c, r in state.iterrows()
    }
    assert got == {
        cid("fullvideo01", 13): ("ok", "", "folder:lab-full", "folder:lab-full"),
        cid("fullvideo02", 0): ("ok", "", "folder:lab-full", "folder:lab-full"),
        cid("audiofirst1", 4): ("ok", "", "folder:lab-full", "hf:audio-mirror"),
        cid("tarprecut01", 21): ("ok", "", "tar:shards", "tar:shards"),
        cid("tarprecut02", 5): ("ok", "", "tar:shards", "tar:shards"),
        cid("hfprecut001", 7): ("ok", "", "hf:hf-clips", "hf:hf-clips"),
        cid("hfpathclip1", 8): ("ok", "", "hf:hf-clips", "hf:hf-clips"),
        cid("silentvid01", 2): ("ok", "", "folder:silent", "folder:wavs"),
        cid("linkprecut1", 0): ("ok", "", "folder:precut", "folder:precut"),
        cid("youtubeonly", 3): ("ok", "", "youtube:youtube", "youtube:youtube"),
        cid("notanywhere", 3): ("failed_permanent", "http_404", None, None),
    }, state[["status", "reason", "message"]]
    # YouTube saw requests for the clips no local source held, and for nothing else.
    assert {name for _, name, _ in server.requests} == {"youtubeonly.mp4", "notanywhere.mp4"}

    # Cut clips: 10 s, at most 360 px high, a keyframe every second, the sound kept.
    tol = ctx.config.download.duration_tolerance_s
    for c in (cid("fullvideo01", 13), cid("fullvideo02", 0), cid("audiofirst1", 4)):
        row = state.loc[c]
        assert abs(row["video_duration_s"] - 10) <= tol and abs(row["audio_duration_s"] - 10) <= tol + 0.1
        assert (row["video_width"], row["video_height"]) == (480, 360)
        assert keyframe_times(ctx.workdir / row["video_path"]) == [float(s) for s in range(10)]
    # Provenance: the file, member or row it came from, and the digest of those bytes.
    full = state.loc[cid("fullvideo01", 13)]
    assert full["video_ref"] == str(src / "full" / "sub" / "Yfullvideo01.mp4")
    assert full["video_digest"] == sha256((src / "full" / "sub" / "Yfullvideo01.mp4").read_bytes())
    tar = state.loc[cid("tarprecut01", 21)]
    assert tar["video_ref"] == f"{src / 'shards' / 'part-000.tar'}:{cid('tarprecut01', 21)}.mp4"
    placed = (ctx.workdir / tar["video_path"]).read_bytes()
    assert tar["video_digest"] == sha256(placed)  # taken as it is: the member's bytes
    hf = state.loc[cid("hfprecut001", 7)]
    assert (ctx.workdir / hf["video_path"]).read_bytes() == hf_clip and hf["video_ref"].endswith("row 0")
    by_path = state.loc[cid("hfpathclip1", 8)]  # the file the row names, taken as it is (mkv)
    assert by_path["video_path"].endswith(".mp4") or by_path["video_path"].endswith(".mkv")
    assert by_path["video_digest"] == sha256((src / "hf-clips" / "files" / "clip.mkv").read_bytes())
    assert state.loc[cid("audiofirst1", 4), "audio_digest"] == sha256(wav880)
    linked = state.loc[cid("linkprecut1", 0)]
    assert os.path.samefile(
        ctx.workdir / linked["video_path"], src / "precut" / f"{cid('linkprecut1', 0)}.mp4"
    )
    assert state.loc[cid("youtubeonly", 3), "source_url"] == server.url_template().format(id="youtubeonly")

    # Stage 2 on what stage 1 placed: the right seconds of the source, the right sound.
    kf = stage_ledger(KeyframesStage(ctx)).latest()
    assert (kf["status"] == "ok").all() and len(kf) == 10
    offsets = {"fullvideo01": 13, "fullvideo02": 0, "audiofirst1": 4, "youtubeonly": 3}
    for c, row in kf.iterrows():
        check_levels(ctx.workdir, row, offsets.get(c[:11], 0))
        assert row["audio_samples"] == 160_000
    hz = {c[:11]: peak_hz(ctx.workdir / r["audio_path"]) for c, r in kf.iterrows()}
    assert hz["audiofirst1"] == pytest.approx(880, abs=5)  # the mirror's sound, not the video's 440
    assert hz["silentvid01"] == pytest.approx(660, abs=5)  # the wav's
    assert hz["fullvideo01"] == pytest.approx(440, abs=5)

    # Clips per source, in the availability report and in `avcaps status`.
    stats = json.loads((ctx.workdir / "01-download" / "stats.json").read_text())
    avail = stats["summary"]["availability"]["test"]
    assert avail["sources"] == {
        "folder:lab-full": 3, "folder:precut": 1, "folder:silent": 1, "hf:hf-clips": 2, "tar:shards": 2,
        "youtube:youtube": 1,
    }  # fmt: skip
    assert avail["audio_sources"]["hf:audio-mirror"] == 1 and avail["audio_sources"]["folder:wavs"] == 1
    assert "clips per source: folder:lab-full 3, folder:precut 1" in format_table(run_status(ctx))
    # One index per local source, under 01-download/sources/.
    names = sorted(p.name for p in (ctx.workdir / "01-download" / "sources").glob("*.parquet"))
    assert names == sorted(
        f"{n}.parquet" for n in ("audio-mirror", "lab-full", "shards", "hf-clips", "silent", "precut", "wavs")
    )


def keyframe_times(path: Path) -> list[float]:
    import av

    with av.open(str(path)) as c:
        return [round(float(f.pts * f.time_base), 2) for f in c.decode(c.streams.video[0]) if f.key_frame]


def test_a_damaged_local_file_falls_through_to_the_next_source(
    tmp_path: Path, media_root: Path, server: MediaServer
) -> None:
    """A corrupt file and a truncated pre-cut clip fail their source's try (corrupt_source, the
    path named) and the next source gives the clip; with no next source, the clip fails so."""
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "Ycorruptvid1.mp4").write_bytes(os.urandom(50_000))  # garbage
    good = make_clip(tmp_path / "good" / "Ycorruptvid1", 20)
    truncated = make_clip(tmp_path / "t" / "x", 20, profile="h264_faststart").read_bytes()
    (lab / "Ytruncated01.mp4").write_bytes(truncated[: len(truncated) * 2 // 5])  # probes long, decodes short
    make_clip(lab / "Yshortsrc001", 4)  # ends before the clip starts: too_short here
    add_source(media_root, "truncated01", "okh264clip1")
    sources = [
        {"kind": "folder", "name": "lab", "path": str(lab), "pattern": "Y{youtube_id}.mp4"},
        {"kind": "folder", "name": "good", "path": str(good.parent), "pattern": "Y{youtube_id}.mp4"},
        {"kind": "youtube", "url_template": server.url_template()},
    ]
    clips = [("corruptvid1", 3), ("truncated01", 3), ("shortsrc001", 5)]
    ctx = run(write_run(tmp_path, clips, sources), ManifestStage, DownloadStage)
    state = stage_ledger(DownloadStage(ctx)).latest()
    corrupt = state.loc[cid("corruptvid1", 3)]
    assert (corrupt["status"], corrupt["video_source"]) == ("ok", "folder:good")
    assert f"folder:lab: corrupt_source: {lab / 'Ycorruptvid1.mp4'}" in corrupt["message"]
    trunc = state.loc[cid("truncated01", 3)]
    assert (trunc["status"], trunc["video_source"]) == ("ok", "youtube:youtube")
    assert "corrupt_source" in trunc["message"] and "Ytruncated01.mp4" in trunc["message"]
    short = state.loc[cid("shortsrc001", 5)]  # too short locally, and not on YouTube either
    assert (short["status"], short["reason"]) == ("failed_permanent", "http_404")
    assert "folder:lab: too_short" in short["message"] and "youtube:youtube: http_404" in short["message"]

    # Without a fallback, the local failure is the clip's.
    only = write_run(tmp_path / "alone", [("corruptvid1", 3)], sources[:1])
    ctx = run(only, ManifestStage, DownloadStage)
    row = stage_ledger(DownloadStage(ctx)).latest().iloc[0]
    assert (row["status"], row["reason"]) == ("failed_permanent", "corrupt_source")
    assert str(lab / "Ycorruptvid1.mp4") in row["message"]


def test_unsafe_names_are_refused_and_named(tmp_path: Path) -> None:
    """Tar members whose names are absolute or climb out with '..', and a symbolic link leading
    out of its folder's root, are refused and named; a safe copy elsewhere is taken instead."""
    outside = make_clip(tmp_path / "elsewhere" / cid("linkoutside", 0), 10)
    lab = tmp_path / "lab"
    lab.mkdir()
    os.symlink(outside, lab / outside.name)  # a link out of the root
    inside = make_clip(lab / "real" / "target", 10)
    os.symlink(inside, lab / f"{cid('linkinside1', 0)}.mp4")  # a link that stays inside: fine
    data = clip_bytes(tmp_path / "m" / "c")
    write_tar(tmp_path / "shards" / "bad.tar", [
        (f"../{cid('climbsout01', 0)}.mp4", data),
        (f"/abs/{cid('absolute001', 0)}.mp4", data),
    ])  # fmt: skip
    spare = tmp_path / "spare"
    spare.mkdir()
    shutil.copyfile(outside, spare / f"{cid('climbsout01', 0)}.mp4")
    sources = [
        {"kind": "folder", "name": "lab", "path": str(lab), "pattern": "{clip_id}.mp4"},
        {
            "kind": "tar",
            "name": "bad",
            "path": str(tmp_path / "shards" / "*.tar"),
            "pattern": "{clip_id}.mp4",
        },
        {"kind": "folder", "name": "spare", "path": str(spare), "pattern": "{clip_id}.mp4"},
    ]
    clips = [("linkoutside", 0), ("linkinside1", 0), ("climbsout01", 0), ("absolute001", 0)]
    ctx = run(write_run(tmp_path, clips, sources), ManifestStage, DownloadStage)
    state = stage_ledger(DownloadStage(ctx)).latest()
    out = state.loc[cid("linkoutside", 0)]
    assert (out["status"], out["reason"]) == ("failed_permanent", "unsafe_source")
    assert str(lab / outside.name) in out["message"] and "outside the source's root" in out["message"]
    assert state.loc[cid("linkinside1", 0), "status"] == "ok"
    climbs = state.loc[cid("climbsout01", 0)]  # refused in the shard, taken from the spare folder
    assert (climbs["status"], climbs["video_source"]) == ("ok", "folder:spare")
    assert f"../{cid('climbsout01', 0)}.mp4 refused: a member name that climbs out" in climbs["message"]
    absolute = state.loc[cid("absolute001", 0)]
    assert (absolute["status"], absolute["reason"]) == ("failed_permanent", "unsafe_source")
    assert f"/abs/{cid('absolute001', 0)}.mp4 refused: an absolute member name" in absolute["message"]
    # Nothing was written outside the run folder's media.
    assert not (tmp_path / "shards" / f"{cid('climbsout01', 0)}.mp4").exists()
    assert not Path(f"/abs/{cid('absolute001', 0)}.mp4").exists()


def test_two_files_for_one_clip_are_named_never_picked(tmp_path: Path, server: MediaServer) -> None:
    lab = tmp_path / "lab"
    make_clip(lab / "twocopies01", 20)  # .mp4
    make_clip(lab / "twocopies01", 20, profile="mpeg4")  # .mkv
    sources = [
        {"kind": "folder", "name": "lab", "path": str(lab), "pattern": "{youtube_id}.*"},
        {"kind": "youtube", "url_template": server.url_template()},
    ]
    ctx = run(write_run(tmp_path, [("twocopies01", 3)], sources), ManifestStage, DownloadStage)
    row = stage_ledger(DownloadStage(ctx)).latest().iloc[0]
    assert (row["status"], row["reason"]) == ("failed_permanent", "ambiguous_source")
    assert str(lab / "twocopies01.mp4") in row["message"] and str(lab / "twocopies01.mkv") in row["message"]
    assert not server.requests  # not silently taken from the next source either


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (
            {"kind": "folder", "path": "{tmp}/nope", "pattern": "{youtube_id}.mp4"},
            "folder {tmp}/nope does not exist",
        ),
        ({"kind": "tar", "path": "{tmp}/none-*.tar", "pattern": "{clip_id}.mp4"}, "no tar shard matches"),
        ({"kind": "hf", "dataset": "{tmp}/no-dataset", "columns": {"clip_id": "c"}}, "does not exist"),
        ({"kind": "folder", "path": "{tmp}/lab", "pattern": "{ytid}.mp4"}, "unknown placeholder {ytid}"),
        ({"kind": "folder", "path": "{tmp}/lab", "pattern": "{start_ms}.mp4"}, "can never match a clip"),
        (
            {"kind": "folder", "path": "{tmp}/lab", "pattern": "{youtube_id}.webm"},
            "none of its 1 name(s) matches",
        ),
    ],
)
def test_a_bad_source_is_exit_2_with_one_line(tmp_path: Path, source: dict[str, Any], says: str) -> None:
    make_clip(tmp_path / "lab" / "okh264clip1", 12)
    source = json.loads(json.dumps(source).replace("{tmp}", str(tmp_path)))
    config = write_run(tmp_path, [("okh264clip1", 0)], [source])
    code, err = finish(avcaps(config, "run", "0"))
    assert code == 0, err
    code, err = finish(avcaps(config, "run", "1"))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    assert says.replace("{tmp}", str(tmp_path)) in lines[0]
    assert not (tmp_path / "run" / "01-download" / "ledger").exists()


def test_the_index_is_built_once_and_follows_the_folder(tmp_path: Path, server: MediaServer) -> None:
    """Built once (a second run reads it), rebuilt when the folder changes; adding a source or
    reordering them leaves every ok row current, and --retry-failed picks up the clips it adds."""
    lab = tmp_path / "lab"
    make_clip(lab / "Yindexclip1x", 20)
    sources = [{"kind": "folder", "name": "lab", "path": str(lab), "pattern": "Y{youtube_id}.mp4"}]
    clips = [("indexclip1x", 3), ("indexclip2x", 3), ("indexclip3x", 3)]
    config = write_run(tmp_path, clips, sources)
    ctx = run(config, ManifestStage, DownloadStage)
    index = ctx.workdir / "01-download" / "sources" / "lab.parquet"
    built = index.stat().st_mtime_ns
    state = stage_ledger(DownloadStage(ctx)).latest()
    assert state.loc[cid("indexclip2x", 3), "reason"] == "not_in_sources"
    run(config, DownloadStage, retry_failed=True)
    assert index.stat().st_mtime_ns == built  # nothing changed: read, not rebuilt

    make_clip(tmp_path / "more" / "Yindexclip2x", 20)  # a second source, listed first
    config = write_run(
        tmp_path,
        clips,
        [{"kind": "folder", "name": "more", "path": str(tmp_path / "more"), "pattern": "Y{youtube_id}.mp4"},
         *sources],
    )  # fmt: skip
    ctx = run(config)
    download = {s["stage"]: s for s in run_status(ctx)["stages"]}["01-download"]
    assert download["stale"] == 0, download
    run(config, DownloadStage)  # a plain run leaves failed clips alone
    assert (
        stage_ledger(DownloadStage(ctx)).latest().loc[cid("indexclip2x", 3), "status"] == "failed_permanent"
    )
    run(config, DownloadStage, retry_failed=True)
    state = stage_ledger(DownloadStage(ctx)).latest()
    assert state.loc[cid("indexclip1x", 3), "video_source"] == "folder:lab"  # its row was kept
    assert state.loc[cid("indexclip1x", 3), "attempts"] == 1
    assert state.loc[cid("indexclip2x", 3), "video_source"] == "folder:more"
    assert state.loc[cid("indexclip3x", 3), "reason"] == "not_in_sources"
    assert index.stat().st_mtime_ns == built

    # A file added to the folder: the index is rebuilt (the folder's mtime changed).
    shutil.copyfile(lab / "Yindexclip1x.mp4", lab / "Yindexclip3x.mp4")
    run(config, DownloadStage, retry_failed=True)
    assert index.stat().st_mtime_ns != built
    state = stage_ledger(DownloadStage(ctx)).latest()
    assert (state["status"] == "ok").all(), state[["status", "reason"]]
    import pyarrow.parquet as pq

    keys = pq.read_table(index, columns=["key"]).column("key").to_pylist()
    assert "yt:indexclip3x" in keys


def test_avcaps_sources_shows_what_each_source_holds_and_writes_nothing(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    for yt in ("sourcesclp1", "sourcesclp2"):
        make_clip(lab / f"Y{yt}", 15)
    make_clip(lab / "Yambiguous1x", 15)
    make_clip(lab / "Yambiguous1x", 15, profile="mpeg4")
    (lab / "README.txt").write_text("our AudioSet copy")
    sources = [
        {"kind": "folder", "name": "lab", "path": str(lab), "pattern": "Y{youtube_id}.*"},
        {"kind": "youtube"},
    ]
    clips = [("sourcesclp1", 1), ("sourcesclp2", 2), ("ambiguous1x", 0), ("elsewhere01", 0)]
    config = write_run(tmp_path, clips, sources)
    run(config, ManifestStage)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    proc = avcaps(config, "sources")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "4 clips in the clip table" in out
    assert "[0] folder:lab" in out and "full-length media, cut here" in out
    assert "index built now (no index yet; not saved" in out
    assert "5 name(s), 4 match the pattern, 1 do not (e.g. README.txt)" in out
    assert "holds 2 of 4 clips (50.0%): test 2" in out
    assert f"e.g. Ysourcesclp1.mp4 -> {cid('sourcesclp1', 1)}" in out
    assert f"ambiguous (a run fails them ambiguous_source): 1\n      {cid('ambiguous1x', 0)}: " in out
    assert (
        "[1] youtube:youtube: https://www.youtube.com/watch?v={id}: the 2 clip(s) no earlier source holds"
        in out
    )
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before  # wrote nothing


def test_two_shards_at_once_index_once(tmp_path: Path) -> None:
    """Two processes (shards 0/2 and 1/2) start stage 1 on the same run folder together: the
    index is built once under its lock, each shard takes its own clips, all end ok."""
    lab = tmp_path / "lab"
    ids = [f"twoshards{i:02d}" for i in range(8)]
    for yt in ids:
        make_clip(lab / f"Y{yt}", 13)
    config = write_run(
        tmp_path,
        [(yt, 1) for yt in ids],
        [{"kind": "folder", "path": str(lab), "pattern": "Y{youtube_id}.mp4"}],
    )
    code, err = finish(avcaps(config, "run", "0"))
    assert code == 0, err
    procs = [avcaps(config, "run", "1", "--shard", f"{i}/2", "--no-progress") for i in range(2)]
    results = [finish(p) for p in procs]
    assert [c for c, _ in results] == [0, 0], results
    state = stage_ledger(DownloadStage, tmp_path / "run").latest()
    assert len(state) == 8 and (state["status"] == "ok").all()
    # Both logs: two runs started in the same second name theirs <stamp>-01-download.log and
    # <stamp>-01-download-<pid>.log (pipeline.runner._claim).
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "runs").glob("*-01-download*.log"))
    assert logs.count("indexed 8 name(s)") == 1, logs


def test_a_full_length_cut_matches_the_exact_cut_of_youtube_path(
    tmp_path: Path, server: MediaServer, media_root: Path
) -> None:
    """The same source through the folder (cut here) and through yt-dlp (ffmpeg's exact cut):
    same size, same keyframes, same seconds of the source on the same frames."""
    add_source(media_root, "samesource1", "okh264clip1")
    lab = tmp_path / "lab"
    lab.mkdir()
    shutil.copyfile(media_root / "okh264clip1.mp4", lab / "samesource1.mp4")
    runs = {}
    for name, sources in {
        "local": [{"kind": "folder", "path": str(lab), "pattern": "{youtube_id}.mp4"}],
        "youtube": [{"kind": "youtube", "url_template": server.url_template()}],
    }.items():
        ctx = run(
            write_run(tmp_path / name, [("samesource1", 3)], sources),
            ManifestStage,
            DownloadStage,
            KeyframesStage,
        )
        runs[name] = (
            stage_ledger(DownloadStage(ctx)).latest().iloc[0],
            stage_ledger(KeyframesStage(ctx)).latest().iloc[0],
            ctx.workdir,
        )
    (lrow, lkf, lwd), (yrow, ykf, ywd) = runs["local"], runs["youtube"]
    for col in ("video_width", "video_height"):
        assert lrow[col] == yrow[col]
    assert abs(lrow["video_duration_s"] - yrow["video_duration_s"]) < 0.15
    assert keyframe_times(lwd / lrow["video_path"]) == keyframe_times(ywd / yrow["video_path"])
    check_levels(lwd, lkf, 3)
    check_levels(ywd, ykf, 3)


def test_ctrl_c_during_a_threaded_batch_of_local_clips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) while clips of local sources are cut in threads ends the batch with the
    interrupt itself; with no YouTube source there is no start gate to open (it was an
    AttributeError that replaced the interrupt)."""
    from pipeline.stage import Item

    lab = tmp_path / "lab"
    for yt in ("ctrlcclip01", "ctrlcclip02"):
        make_clip(lab / f"Y{yt}", 13)
    sources = [{"kind": "folder", "path": str(lab), "pattern": "Y{youtube_id}.mp4"}]
    ctx = run(
        write_run(tmp_path, [("ctrlcclip01", 1), ("ctrlcclip02", 1)], sources, concurrency=2), ManifestStage
    )
    stage = DownloadStage(ctx)
    stage.setup()
    take = DownloadStage._one

    def interrupted(self: DownloadStage, item: Item) -> Any:
        if item.clip_id.startswith("ctrlcclip02"):
            raise KeyboardInterrupt
        return take(self, item)

    monkeypatch.setattr(DownloadStage, "_one", interrupted)
    clips = stage_ledger(ManifestStage(ctx)).latest()
    batch = [Item(c, dict(row)) for c, row in clips.iterrows()]
    with pytest.raises(KeyboardInterrupt):
        stage.process(batch)
