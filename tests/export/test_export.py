"""Stage 6 through the real runner on run folders written to the column contract."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.errors import AbortRun
from pipeline.ledger import Ledger
from pipeline.selection import stage_ledger
from stages.caption.stage import CaptionStage
from stages.export.variants import VARIANTS
from stages.merge.stage import MergeStage
from standins.contract_run import DEFAULT_FAILURES, ContractRun, build_contract_run
from standins.run_history import Failure


def _load(folder: Path, config: str, cache: Path):  # type: ignore[no-untyped-def]
    from datasets import load_dataset

    return load_dataset(str(folder), config, cache_dir=str(cache))


def _clips(workdir: Path) -> pd.DataFrame:
    return Ledger(workdir / "00-manifest" / "ledger").latest()


@pytest.mark.slow
def test_load_dataset_round_trip_for_every_config(
    base_contract: ContractRun, run_copy: Callable[..., Path], export: Callable[..., Path], tmp_path: Path
) -> None:
    workdir = run_copy()
    folder = export(workdir)
    clips = _clips(workdir)
    reviews = pd.read_parquet(workdir / "05-review" / "reviews.parquet").set_index("clip_id")
    visual = Ledger(workdir / "03-caption" / "ledger").latest()["visual_caption"]
    stats = json.loads((folder / "statistics.json").read_text())
    # 6 clips per split; failed: train 2, val 2, test 2 (one in the merge); test: 1 rejected
    assert stats["counts"] == {"train": 4, "validation": 4, "test": 3}
    rejected = set(reviews.index[reviews["verdict"] == "rejected"])
    # Clips retried before they succeeded are exported (one per stage at least); failed ones never.
    retried_ok = {c for c in base_contract.retried if c not in base_contract.failed and c not in rejected}
    stages = {base_contract.retried[c].name for c in retried_ok}
    assert stages == {"download", "keyframes", "caption", "merge"}
    for config in VARIANTS:
        ds = _load(folder, config, tmp_path / "cache")
        assert sorted(ds) == ["test", "train", "validation"]
        for split, n in stats["counts"].items():
            assert ds[split].num_rows == n
        exported = {cid for split in ds.values() for cid in split["clip_id"]}
        assert retried_ok <= exported and not exported & (set(base_contract.failed) | rejected)
        for split in ds.values():  # the middle keyframe, read from a ledger that has failed rows
            frames = zip(split["clip_id"], split["frame_path"], split["frame_time_s"], strict=True)
            assert all((f, t) == (f"media/frames/{cid}/1.jpg", 5.0) for cid, f, t in frames)
        for row in ds["train"]:
            clip = clips.loc[row["clip_id"]]
            assert row["audio_captions"] == list(clip["audio_captions"])
            assert row["youtube_id"] == clip["youtube_id"] and row["start_time"] == clip["start_s"]
            assert row["visual_caption"] == " ".join((visual[row["clip_id"]] or "").split())
            assert row["variant"] == config and row["review_verdict"] is None
            assert row["caption"] == row["captions"][0]
        for row in ds["validation"]:
            n_refs = 5 + bool(row["visual_caption"]) if config == "per_modality" else 5
            assert len(row["captions"]) == n_refs
        for row in ds["test"]:
            review = reviews.loc[row["clip_id"]]
            assert row["review_verdict"] == review["verdict"] in ("accept", "edited")
            assert row["captions"] == list(review["final_captions"])
            assert row["caption_sources"] == ["merged"] * len(row["captions"])
            assert row["merge_prompt_hash"] == "p0h4sh" and row["caption_model"] == "standin/tiny-blip2"
    default = _load(folder, None, tmp_path / "cache")  # type: ignore[arg-type]
    assert default["train"][0]["variant"] == "and"


def test_export_is_deterministic_and_checksummed(
    run_copy: Callable[..., Path], export: Callable[..., Path]
) -> None:
    a = run_copy("a")
    first = export(a)
    snapshot = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    again = export(a)  # the same run exported twice
    assert {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file()} == snapshot
    b = run_copy("b")  # and a copy of the run in another folder
    other = export(b)
    assert {p.relative_to(other): p.read_bytes() for p in other.rglob("*") if p.is_file()} == snapshot
    sums = dict(line.split("  ")[::-1] for line in (first / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == sorted(str(p) for p in snapshot if str(p) != "SHA256SUMS")
    import hashlib

    for name, digest in sums.items():
        assert hashlib.sha256(snapshot[Path(name)]).hexdigest() == digest
    meta = pq.read_metadata(first / "data/and/train-00000-of-00001.parquet")
    assert b"pandas" not in (meta.metadata or {})
    assert not list(a.glob(".tmp-*"))  # the temporary export folder is gone


def test_card_states_counts_reviews_statistics_and_validates(
    run_copy: Callable[..., Path], export: Callable[..., Path]
) -> None:
    from huggingface_hub import DatasetCard

    from stages.export.card import validate_card

    folder = export(run_copy())
    meta = validate_card(folder / "README.md")
    assert [c["config_name"] for c in meta["configs"]] == list(VARIANTS)
    card = DatasetCard.load(folder / "README.md")
    text = card.text
    assert "| train | 6 | private 1 | caption:corrupt_frame 1 | 4 |" in text
    assert "| validation | 6 | http_429 1 | keyframes:corrupt_video 1 | 4 |" in text
    assert "| test | 6 | removed 1 | merge:gate_missing_visual 1 | 3 |" in text
    assert "4 reviewed: 2 accepted as is,\n  1 edited, 1 rejected (excluded)" in text
    assert "merge prompt hash(es): `p0h4sh`" in text
    assert "[a-z]+('[a-z]+)?" in text and "10.27" in text
    assert "academic purposes" in text and "@inproceedings{kim2019audiocaps" in text
    stats = json.loads((folder / "statistics.json").read_text())
    test_stats = stats["splits"]["test"]
    assert set(test_stats) == {"AudioCaps", "AudioVisualCaps"}
    assert f"| test | AudioVisualCaps | {test_stats['AudioVisualCaps']['captions']} |" in text
    assert set(stats["splits"]["train"]) == {"AudioCaps"} | {f"AudioVisualCaps ({v})" for v in VARIANTS}
    assert "MIT License" in (folder / "LICENSE").read_text()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.pop("license_name"), "license_name"),
        (lambda m: m.update(size_categories=["tiny"]), r"size_categories\[0\]"),
        (lambda m: m["configs"][1]["data_files"][0].update(path="data/nope/*.parquet"), r"configs\[1\]"),
        (lambda m: m["configs"][2].update(config_name="random"), r"configs\[2\]\.config_name"),
        (lambda m: m.update(pretty_name=""), "pretty_name"),
    ],
)
def test_card_field_that_fails_is_named(
    run_copy: Callable[..., Path], export: Callable[..., Path], edit, field: str
) -> None:  # type: ignore[no-untyped-def]
    import yaml

    from stages.export.card import CardError, validate_card

    folder = export(run_copy())
    text = (folder / "README.md").read_text()
    _, head, body = text.split("---\n", 2)
    meta = yaml.safe_load(head)
    edit(meta)
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body)
    with pytest.raises(CardError, match=f"card field {field}"):
        validate_card(folder / "README.md")


def test_missing_upstream_items_name_the_stage_and_count(
    base_contract: ContractRun, tmp_path: Path, export: Callable[..., Path]
) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    work = tmp_path / "run"
    shutil.copytree(base_contract.workdir, work)
    # Two val clips that reached stage 3 (val 0 and 1 failed before it) lose their caption rows,
    # retried one included: as if stage 3 had not got to them yet.
    val = base_contract.ids("val")
    assert {val[0], val[1]} <= set(base_contract.failed) and base_contract.retried[val[3]] is CaptionStage
    ledger = stage_ledger(CaptionStage, work)
    history = ledger.read()
    ledger.replace_all(history.filter(pc.invert(pc.is_in(history["clip_id"], pa.array(val[2:4])))))
    with pytest.raises(AbortRun, match=r"stage 03-caption: 2 of 4 val item\(s\) have no result yet"):
        export(work)
    shutil.rmtree(work / "04-merge")
    with pytest.raises(AbortRun, match=r"stage 04-merge: 5 of 5 test item\(s\)") as err:
        export(work)
    assert "03-caption" in str(err.value)  # every unfinished stage is named at once
    assert not (work / "export").exists()


def test_unreviewed_test_items_stop_the_export_unless_allowed(
    tmp_path: Path, export: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = build_contract_run(tmp_path / "run", sample_per_split=4, review_default=None, verdicts={})
    test_ids = run.ids("test")
    assert test_ids[0] in run.failed  # failed downloads are never reviewed: 3 clips wait for a review
    with pytest.raises(AbortRun, match=r"stage 05-review: 3 of 3 test item\(s\).*allow_unreviewed=true"):
        export(run.workdir)
    folder = export(run.workdir, "export.allow_unreviewed=true")
    table = pq.read_table(folder / "data/and/test-00000-of-00001.parquet").to_pylist()
    assert [r["clip_id"] for r in table] == test_ids[1:]  # the retried ones (1-3) included
    assert {r["review_verdict"] for r in table} == {"unreviewed"}
    assert all(r["captions"] == r["merged_captions"] for r in table)
    stats = json.loads((folder / "statistics.json").read_text())
    assert stats["unreviewed_test_items"] == 3
    assert "3 test clips are unreviewed" in (folder / "README.md").read_text()


def test_merged_validation_split_uses_its_merges(tmp_path: Path, export: Callable[..., Path]) -> None:
    # val 0 fails its keyframes (as by default), val 3 its merge; val 4 is merged on a second try
    failures = DEFAULT_FAILURES | {("val", 3): Failure(MergeStage, "gate_missing_audio")}
    run = build_contract_run(
        tmp_path / "run", sample_per_split=5, merge_splits=("val", "test"), failures=failures
    )
    val = run.ids("val")
    assert run.retried[val[4]] is MergeStage
    folder = export(run.workdir)
    for variant in ("random", "per_modality"):
        rows = pq.read_table(folder / f"data/{variant}/validation-00000-of-00001.parquet").to_pylist()
        assert [r["clip_id"] for r in rows] == [val[1], val[2], val[4]]
        assert all(r["caption_sources"] == ["merged"] * 5 for r in rows)
    stats = json.loads((folder / "statistics.json").read_text())
    assert stats["merged_splits"] == ["validation", "test"]
    assert stats["availability"]["validation"]["failed_merge"] == {"gate_missing_audio": 1}
    assert set(stats["splits"]["validation"]) == {"AudioCaps", "AudioVisualCaps"}
    rebuilt = build_contract_run(
        tmp_path / "partial",
        sample_per_split=5,
        merge_splits=("val", "test"),
        failures=failures,
        skip={MergeStage: {("val", 1)}},
    )
    with pytest.raises(AbortRun, match=r"stage 04-merge: 1 of 4 val item\(s\) have no result yet"):
        export(rebuilt.workdir)


@pytest.mark.slow
def test_embedded_media_and_bounded_shards(
    run_copy: Callable[..., Path], export: Callable[..., Path], tmp_path: Path
) -> None:
    from datasets import Audio, Image

    workdir = run_copy()
    lost = sorted(_clips(workdir).query("split == 'test'").index)[4]  # accepted, merged on a retry
    (workdir / "media" / "audio" / f"{lost}.wav").unlink()  # one clip lost its audio
    sets = ("export.embed_media=true", "export.max_shard_bytes=4000", "export.variants=[and]")
    folder = export(workdir, *sets)
    shards = sorted((folder / "data/and").glob("train-*.parquet"))
    assert len(shards) > 1 and shards[0].name.endswith(f"-of-{len(shards):05d}.parquet")
    ds = _load(folder, "and", tmp_path / "cache")
    assert isinstance(ds["train"].features["image"], Image)
    assert isinstance(ds["train"].features["audio"], Audio)
    # Decoding Audio needs torchcodec (not installed here); the raw bytes prove the embedding.
    train = ds["train"].cast_column("audio", Audio(decode=False))
    assert train[0]["image"].size == (32, 24)  # decoded by datasets' Image feature (PIL)
    raw = train[0]["audio"]
    assert raw["bytes"][:4] == b"RIFF"
    assert lost not in set(ds["test"]["clip_id"])
    stats = json.loads((folder / "statistics.json").read_text())
    assert list(stats["excluded_media_missing"]) == [lost]
    assert stats["excluded_media_missing"][lost] == f"media missing: audio_path=media/audio/{lost}.wav"
    assert stats["counts"]["test"] == 2
    card = (folder / "README.md").read_text()
    assert "| test | 6 | removed 1 | merge:gate_missing_visual 1, media missing 1 | 2 |" in card


def test_export_pulls_reviews_first_and_names_the_way_out(
    run_copy: Callable[..., Path], export: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with a review project pulls before exporting; with the server down the export stops
    (never ships stale references silently) and says how to export the reviews pulled last."""
    import json
    import socket

    from pipeline.errors import AbortRun

    workdir = run_copy()
    (workdir / "05-review" / "project.json").write_text(json.dumps({"project_id": 7, "title": "t"}))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
    with pytest.raises(AbortRun) as err:
        export(workdir, f"review.url={dead}", "review.timeout_s=2")
    assert dead in str(err.value) and "export.pull_reviews=false" in str(err.value)
    assert not (workdir / "export").exists()
    out = export(workdir, f"review.url={dead}", "export.pull_reviews=false")
    assert (out / "README.md").exists()
