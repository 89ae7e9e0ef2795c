"""``avcaps perturb``: exact sizes and lengths, Gaussian level, derangements, determinism."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
from click.testing import CliRunner
from PIL import Image

from evalkit.perturb import (
    CONDITIONS,
    clip_rng,
    derangement,
    perturb,
    read_condition_manifest,
    read_export_sources,
    read_manifest_sources,
    read_run_sources,
)
from pipeline.cli import main
from pipeline.errors import AbortRun
from pipeline.selection import stage_ledger
from stages.download.stage import DownloadStage
from stages.keyframes import KeyframesStage
from stages.manifest import ManifestStage
from standins.run_history import Failure, clip_histories, commit_histories, ok_outputs


def test_derangement_property_on_many_seeds() -> None:
    seen = set()
    for seed in range(400):
        n = 2 + seed % 60
        perm = derangement(n, seed)
        assert sorted(perm) == list(range(n)), "every stream used exactly once"
        assert all(p != i for i, p in enumerate(perm)), "nobody keeps its own stream"
        assert derangement(n, seed) == perm, "deterministic given the seed"
        if n == 10:
            seen.add(tuple(perm))
    assert len(seen) > 1, "different seeds give different derangements"
    # n = 2 has one derangement; n = 3 has two, and the sampler reaches both.
    assert derangement(2, 5) == [1, 0]
    assert {tuple(derangement(3, s)) for s in range(50)} == {(1, 2, 0), (2, 0, 1)}
    with pytest.raises(AbortRun, match="at least 2 clips"):
        derangement(1, 0)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def perturbed(media: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("perturbed")
    summary = perturb(read_manifest_sources(media), out, seed=3, noise_std=0.05)
    return out, summary


def test_every_condition_has_a_manifest_of_all_clips(media: Path, perturbed) -> None:
    out, summary = perturbed
    sources = read_manifest_sources(media)
    assert summary["clips"] == len(sources) and summary["skipped"] == {}
    for cond in CONDITIONS:
        rows = read_condition_manifest(out / cond / "manifest.csv")
        assert [r["clip_id"] for r in rows] == sorted(sources)
        for r in rows:
            assert Path(r["image"]).is_file() and Path(r["audio"]).is_file()
    clean = read_condition_manifest(out / "clean" / "manifest.csv")
    for r in clean:
        assert Path(r["image"]) == sources[r["clip_id"]].image.resolve()
        assert r["image_source"] == r["audio_source"] == r["clip_id"]


def test_images_same_size_lossless(media: Path, perturbed) -> None:
    out, _ = perturbed
    sources = read_manifest_sources(media)
    for cond, expect in (("visual_black", 0), ("visual_white", 255), ("visual_noise", None)):
        for r in read_condition_manifest(out / cond / "manifest.csv"):
            src = sources[r["clip_id"]]
            assert Path(r["audio"]) == src.audio.resolve(), "the audio stays clean"
            assert r["image"].endswith(".png")
            with Image.open(r["image"]) as im, Image.open(src.image) as orig:
                assert im.size == orig.size and im.mode == "RGB"
                pixels = np.asarray(im)
            if expect is not None:
                assert (pixels == expect).all()
            else:
                # Lossless: exactly the seeded uniform noise, read back bit for bit.
                w, h = im.size
                expected = clip_rng(3, 0, r["clip_id"]).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                assert np.array_equal(pixels, expected)
    big = read_condition_manifest(out / "visual_noise" / "manifest.csv")
    pixels = np.asarray(Image.open(next(r["image"] for r in big if r["clip_id"].startswith("clip02"))))
    assert abs(pixels.mean() - 127.5) < 1.0 and pixels.min() == 0 and pixels.max() == 255


def test_audio_same_length_rate_channels_and_gaussian_level(media: Path, perturbed) -> None:
    out, _ = perturbed
    sources = read_manifest_sources(media)
    for cond in ("audio_silent", "audio_gaussian"):
        for r in read_condition_manifest(out / cond / "manifest.csv"):
            src = sources[r["clip_id"]]
            assert Path(r["image"]) == src.image.resolve(), "the image stays clean"
            info, orig = sf.info(r["audio"]), sf.info(str(src.audio))
            assert (info.frames, info.samplerate, info.channels) == (
                orig.frames,
                orig.samplerate,
                orig.channels,
            )
            data, _ = sf.read(r["audio"], dtype="float64")
            if cond == "audio_silent":
                assert not data.any()
            elif info.frames >= 100_000:
                # std of a sample std is sigma / sqrt(2N): < 0.3% here; allow 2%.
                assert data.std() == pytest.approx(0.05, rel=0.02)
                assert abs(data.mean()) < 0.002


def test_shuffles_are_derangements_of_the_streams(media: Path, perturbed) -> None:
    out, _ = perturbed
    sources = read_manifest_sources(media)
    for cond, stream in (("visual_shuffled", "image"), ("audio_shuffled", "audio")):
        rows = read_condition_manifest(out / cond / "manifest.csv")
        donors = [r[f"{stream}_source"] for r in rows]
        assert sorted(donors) == sorted(sources), "every stream used once"
        for r in rows:
            assert r[f"{stream}_source"] != r["clip_id"]
            assert Path(r[stream]) == getattr(sources[r[f"{stream}_source"]], stream).resolve()
            other = "audio" if stream == "image" else "image"
            assert Path(r[other]) == getattr(sources[r["clip_id"]], other).resolve()
    v = [r["image_source"] for r in read_condition_manifest(out / "visual_shuffled" / "manifest.csv")]
    a = [r["audio_source"] for r in read_condition_manifest(out / "audio_shuffled" / "manifest.csv")]
    assert v != a, "the two shuffles use their own derangements"


def _fingerprint(out: Path) -> dict[str, list[tuple[str, str, str, str, str]]]:
    result = {}
    for cond in CONDITIONS:
        rows = read_condition_manifest(out / cond / "manifest.csv")
        result[cond] = [
            (r["clip_id"], r["image_source"], r["audio_source"], _sha(r["image"]), _sha(r["audio"]))
            for r in rows
        ]
    return result


def test_deterministic_given_the_seed_and_resumable(media: Path, perturbed, tmp_path: Path) -> None:
    out, _ = perturbed
    sources = read_manifest_sources(media)
    again = tmp_path / "again"
    perturb(dict(reversed(list(sources.items()))), again, seed=3, noise_std=0.05)
    assert _fingerprint(again) == _fingerprint(out)
    other = tmp_path / "other"
    perturb(sources, other, seed=4, noise_std=0.05)
    a, b = _fingerprint(out), _fingerprint(other)
    assert a["visual_black"] == b["visual_black"] and a["visual_noise"] != b["visual_noise"]
    # Rerun into the same folder: kept files, same result; other settings are refused.
    (again / "visual_noise" / "manifest.csv").unlink()
    perturb(sources, again, seed=3, noise_std=0.05)
    assert _fingerprint(again) == _fingerprint(out)
    with pytest.raises(AbortRun, match="made with"):
        perturb(sources, again, seed=9, noise_std=0.05)


def test_unreadable_clips_are_skipped_and_named(media: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(media.open()))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows += [
        {
            "clip_id": "broken_img",
            "image": str(tmp_path / "broken.jpg"),
            "audio": str(media.parent / rows[0]["audio"]),
        },
        {
            "clip_id": "no_audio",
            "image": str(media.parent / rows[0]["image"]),
            "audio": str(tmp_path / "gone.wav"),
        },
    ]
    manifest = tmp_path / "m.csv"
    for r in rows[:-2]:
        r["image"], r["audio"] = str(media.parent / r["image"]), str(media.parent / r["audio"])
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["clip_id", "image", "audio"])
        w.writeheader()
        w.writerows(rows)
    summary = perturb(read_manifest_sources(manifest), tmp_path / "out", seed=0)
    assert set(summary["skipped"]) == {"broken_img", "no_audio"}
    assert "broken.jpg" in summary["skipped"]["broken_img"] and "gone.wav" in summary["skipped"]["no_audio"]
    ids = [
        r["clip_id"] for r in read_condition_manifest(tmp_path / "out" / "audio_shuffled" / "manifest.csv")
    ]
    assert len(ids) == len(rows) - 2 and "broken_img" not in ids


def test_run_folder_source_and_cli(media: Path, tmp_path: Path) -> None:
    """A run folder as stages 0-2 leave it: middle keyframe + audio of the test clips whose
    keyframes are ok in the end (a clip retried in stage 2 included; one failed there, one whose
    download failed and so has no keyframes row, left out)."""
    run = tmp_path / "run"
    sources = read_manifest_sources(media)
    ids = sorted(sources)
    lost = "dlfail00000_0_10000"
    failures = {lost: Failure(DownloadStage, "private"), ids[1]: Failure(KeyframesStage, "corrupt_video")}
    retried = {ids[2]: KeyframesStage, ids[3]: DownloadStage}
    manifest_rows, histories = [], []
    for i, cid in enumerate([*ids, lost]):
        youtube_id = cid.rsplit("_", 2)[0]
        manifest_rows.append(
            {
                "clip_id": cid,
                "status": "ok",
                "attempts": 1,
                "youtube_id": youtube_id,
                "start_s": 0,
                "end_s": 10,
                "split": "train" if i == 0 else "test",
                "audio_captions": ["a dog barks"],
                "audiocap_ids": [i + 1],
            }
        )
        frames, audio = [], ""
        if cid in sources:
            frames_dir = run / "media" / "frames" / cid
            frames_dir.mkdir(parents=True)
            for k in range(3):
                (frames_dir / f"{k}.jpg").write_bytes(sources[cid].image.read_bytes())
                frames.append(f"media/frames/{cid}/{k}.jpg")
            audio_file = run / "media" / "audio" / f"{cid}{sources[cid].audio.suffix}"
            audio_file.parent.mkdir(parents=True, exist_ok=True)
            audio_file.write_bytes(sources[cid].audio.read_bytes())
            audio = str(audio_file.relative_to(run))
        outputs = ok_outputs(cid, youtube_id, frames, audio, "a dog on a lawn", ["a dog barks on a lawn"])
        histories.append(
            clip_histories(
                cid,
                {DownloadStage: outputs[DownloadStage], KeyframesStage: outputs[KeyframesStage]},
                failure=failures.get(cid),
                retried_in=retried.get(cid),
            )
        )
    stage_ledger(ManifestStage, run).commit(manifest_rows)
    commit_histories(run, histories)
    found = read_run_sources(run)
    assert sorted(found) == ids[2:], "test split, ok keyframes only (the retried clip included)"
    assert found[ids[2]].image == run / "media" / "frames" / ids[2] / "1.jpg"
    assert sorted(read_run_sources(run, split=None)) == [ids[0], *ids[2:]]

    r = CliRunner().invoke(main, ["perturb", "--run", str(run), "--out", str(tmp_path / "p"), "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert f"{len(ids) - 2} clips x 8 conditions" in r.output
    rows = read_condition_manifest(tmp_path / "p" / "audio_gaussian" / "manifest.csv")
    assert [x["clip_id"] for x in rows] == ids[2:]
    r = CliRunner().invoke(main, ["perturb", "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "exactly one of --run DIR, --export DIR" in r.output


def test_export_sources_paths_and_embedded_media(media: Path, tmp_path: Path) -> None:
    """An export as stage 6 writes it: frame_path / audio_path relative to the run folder, and
    with embed_media the bytes in image / audio struct columns."""
    import pyarrow.parquet as pq

    sources = read_manifest_sources(media)
    ids = sorted(sources)
    run = tmp_path / "run"
    for cid in ids:
        for kind, src in (("frames", sources[cid].image), ("audio", sources[cid].audio)):
            dest = run / "media" / kind / f"{cid}{src.suffix}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(src.read_bytes())
    rel = {
        c: (f"media/frames/{c}{sources[c].image.suffix}", f"media/audio/{c}{sources[c].audio.suffix}")
        for c in ids
    }
    for config in ("and", "concat"):
        folder = run / "export" / "data" / config
        folder.mkdir(parents=True)
        table = pa.table(
            {
                "clip_id": ids,
                "captions": [["a dog barks"]] * len(ids),
                "frame_path": [rel[c][0] for c in ids],
                "audio_path": [rel[c][1] for c in ids],
            }
        )
        pq.write_table(table, folder / "test-00000-of-00001.parquet")
    found = read_export_sources(run, tmp_path / "unused")
    assert sorted(found) == ids and found[ids[0]].image == run / rel[ids[0]][0]
    assert read_export_sources(run / "export", tmp_path / "unused", config_name="concat") == found

    embedded = tmp_path / "embedded" / "data" / "and"
    embedded.mkdir(parents=True)
    media_col = [{"bytes": sources[c].image.read_bytes(), "path": sources[c].image.name} for c in ids]
    audio_col = [{"bytes": sources[c].audio.read_bytes(), "path": sources[c].audio.name} for c in ids]
    pq.write_table(
        pa.table({"clip_id": ids, "frame_path": [None] * len(ids), "image": media_col, "audio": audio_col}),
        embedded / "test-00000-of-00001.parquet",
    )
    out = tmp_path / "p"
    r = CliRunner().invoke(main, ["perturb", "--export", str(tmp_path / "embedded"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = read_condition_manifest(out / "visual_noise" / "manifest.csv")
    assert [x["clip_id"] for x in rows] == ids
    for x in read_condition_manifest(out / "clean" / "manifest.csv"):
        assert Path(x["image"]).read_bytes() == sources[x["clip_id"]].image.read_bytes()
        assert Path(x["audio"]).read_bytes() == sources[x["clip_id"]].audio.read_bytes()
