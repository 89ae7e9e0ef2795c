"""Stage 0: the real AudioCaps CSVs, sampling, rerun behaviour, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from engine_helpers import REAL_CSV_DIR, avcaps, write_config, write_csvs

from pipeline.config import load_config
from pipeline.errors import AbortRun
from pipeline.runner import run_stage
from pipeline.stage import RunContext, RunOptions
from stages.config import RunConfig
from stages.manifest import ManifestStage, clip_id_for


def ctx_for(cfg_path: Path, *overrides: str) -> RunContext:
    cfg = load_config(RunConfig, cfg_path, list(overrides))
    return RunContext(workdir=cfg.workdir, config=cfg)


def ledger_df(workdir: Path) -> pd.DataFrame:
    return pd.read_parquet(workdir / "00-manifest" / "ledger")


@pytest.mark.slow
def test_real_audiocaps_table(tmp_path: Path) -> None:
    proc = avcaps(
        "run",
        "0",
        "--config",
        "manifests/audiocaps.yaml",
        "--workdir",
        str(tmp_path),
        "--no-progress",
        app=None,
        check=True,
    )
    assert "51308 clips" in proc.stdout
    df = ledger_df(tmp_path)
    assert len(df) == 51308 and df["clip_id"].is_unique
    assert df["split"].value_counts().to_dict() == {"train": 49838, "test": 975, "val": 495}
    ncap = df["audio_captions"].map(len)
    assert set(ncap[df["split"] == "train"]) == {1}
    assert set(ncap[df["split"] != "train"]) == {5}
    assert (df["audiocap_ids"].map(len) == ncap).all()
    row = df[df["clip_id"] == "7fmOlUlwoNg_20000_30000"].iloc[0]
    assert (row["youtube_id"], row["start_s"], row["end_s"], row["split"]) == ("7fmOlUlwoNg", 20, 30, "test")
    assert "Constant rattling noise and sharp vibrations" in list(row["audio_captions"])

    status = json.loads(
        avcaps(
            "status",
            "--config",
            "manifests/audiocaps.yaml",
            "--workdir",
            str(tmp_path),
            "--json",
            app=None,
            check=True,
        ).stdout
    )
    st0 = status["stages"][0]
    assert st0["stage"] == "00-manifest" and st0["ok"] == 51308 and st0["pending"] == 0
    assert st0["by_split"] == {"test": 975, "train": 49838, "val": 495}

    again = avcaps(
        "run",
        "manifest",
        "--config",
        "manifests/audiocaps.yaml",
        "--workdir",
        str(tmp_path),
        app=None,
        check=True,
    )
    assert "nothing to do" in again.stdout


def test_clip_id_naming() -> None:
    assert clip_id_for("7fmOlUlwoNg", 20) == "7fmOlUlwoNg_20000_30000"
    assert clip_id_for("abcdefghijk", 0) == "abcdefghijk_0_10000"


GOOD = {
    "train": [(1, "aaaaaaaaaaa", 10, "A dog barks"), (2, "bbbbbbbbbbb", 0, "Rain falls")],
    "test": [
        (3, "ccccccccccc", 30, "A man speaks"),
        (4, "ccccccccccc", 30, "Someone talks"),
        (5, "ddddddddddd", 40, "Birds chirp"),
    ],
}


def test_small_table_groups_captions(tmp_path: Path) -> None:
    csv_dir = write_csvs(tmp_path / "csv", GOOD)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["train", "test"])
    ctx = ctx_for(cfg)
    run_stage(ManifestStage, ctx, RunOptions(progress=False))
    df = ledger_df(ctx.workdir).set_index("clip_id")
    assert list(df.loc["ccccccccccc_30000_40000", "audio_captions"]) == ["A man speaks", "Someone talks"]
    assert list(df.loc["ccccccccccc_30000_40000", "audiocap_ids"]) == [3, 4]
    assert len(df) == 4


def test_sample_and_limit_are_seeded(tmp_path: Path) -> None:
    rows = [(i + 1, f"x{i:010d}", i, f"caption {i}") for i in range(50)]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "r1", csv_dir, ["test"])
    picks = []
    for name, seed in (("r1", 0), ("r2", 0), ("r3", 1)):
        ctx = ctx_for(
            cfg, f"workdir={tmp_path / name}", "manifest.sample_per_split=7", f"manifest.seed={seed}"
        )
        run_stage(ManifestStage, ctx, RunOptions(progress=False))
        picks.append(sorted(ledger_df(ctx.workdir)["clip_id"]))
    assert len(picks[0]) == 7 and picks[0] == picks[1] and picks[0] != picks[2]
    ctx = ctx_for(cfg, f"workdir={tmp_path / 'lim'}")
    run_stage(ManifestStage, ctx, RunOptions(limit=5, progress=False))
    assert len(ledger_df(ctx.workdir)) == 5


def test_changed_input_needs_force(tmp_path: Path) -> None:
    csv_dir = write_csvs(tmp_path / "csv", GOOD)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["train", "test"])
    run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    changed = {**GOOD, "train": [*GOOD["train"], (9, "eeeeeeeeeee", 5, "Wind blows")]}
    write_csvs(csv_dir, changed)
    with pytest.raises(AbortRun, match="--force"):
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    assert len(ledger_df(tmp_path / "run")) == 4  # the old table is untouched
    run_stage(ManifestStage, ctx_for(cfg), RunOptions(force=True, progress=False))
    assert len(ledger_df(tmp_path / "run")) == 5


BAD_CASES = [
    ("malformed youtube id", {"test": [(1, "bad id!!", 0, "x")]}, "test.csv:2: malformed youtube_id"),
    ("too short youtube id", {"test": [(1, "abc", 0, "x")]}, "test.csv:2: malformed youtube_id"),
    ("negative start", {"test": [(1, "aaaaaaaaaaa", -10, "x")]}, "test.csv:2: start_time '-10'"),
    ("non-integer start", {"test": [(1, "aaaaaaaaaaa", 2.5, "x")]}, "test.csv:2: start_time '2.5'"),
    ("text start", {"test": [(1, "aaaaaaaaaaa", "ten", "x")]}, "test.csv:2: start_time 'ten'"),
    # Both readers apply one rule set (stages/manifest.py): what one took and the other refused
    # before is refused by both now.
    ("exponent start", {"test": [(1, "aaaaaaaaaaa", "3e1", "x")]}, "test.csv:2: start_time '3e1'"),
    ("non-ASCII digits", {"test": [("١٢", "aaaaaaaaaaa", 0, "x")]}, "test.csv:2: audiocap_id '١٢' is not"),
    (
        "19-digit id",
        {"test": [(10**18, "aaaaaaaaaaa", 0, "x")]},
        "test.csv:2: audiocap_id '1000000000000000000'",
    ),
    (
        "empty caption",
        {"test": [(1, "aaaaaaaaaaa", 0, "A"), (2, "bbbbbbbbbbb", 0, "  ")]},
        "test.csv:3: empty caption",
    ),
    (
        "duplicate audiocap_id",
        {"test": [(7, "aaaaaaaaaaa", 0, "A"), (7, "bbbbbbbbbbb", 0, "B")]},
        "test.csv:3: duplicate audiocap_id 7",
    ),
    (
        "clip in two splits",
        {"train": [(1, "aaaaaaaaaaa", 0, "A")], "test": [(2, "aaaaaaaaaaa", 0, "B")]},
        "test.csv:2: clip aaaaaaaaaaa_0_10000 is in split 'test' and also in 'train'",
    ),
]


@pytest.mark.parametrize(("what", "splits", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_rows_stop_stage_0(tmp_path: Path, what: str, splits: dict, expected: str) -> None:
    csv_dir = write_csvs(tmp_path / "csv", splits)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, list(splits))
    with pytest.raises(AbortRun) as err:
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    assert expected in str(err.value)
    assert str(csv_dir) in str(err.value)
    assert not (tmp_path / "run" / "00-manifest" / "ledger").exists()  # nothing written


def _rewrite(csv_dir: Path, name: str, data: bytes) -> None:
    (csv_dir / name).write_bytes(data)


def test_missing_column(tmp_path: Path) -> None:
    csv_dir = write_csvs(tmp_path / "csv", {"test": [(1, "aaaaaaaaaaa", 0, "x")]}, checksums=False)
    _rewrite(csv_dir, "test.csv", b"audiocap_id,youtube_id,caption\n1,aaaaaaaaaaa,x\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["test"], "  checksums: null\n")
    with pytest.raises(AbortRun, match=r"test\.csv:1: missing column\(s\) start_time"):
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    assert not (tmp_path / "run" / "00-manifest").exists()


def test_non_utf8_byte(tmp_path: Path) -> None:
    csv_dir = write_csvs(tmp_path / "csv", {"test": [(1, "aaaaaaaaaaa", 0, "x")]}, checksums=False)
    _rewrite(
        csv_dir,
        "test.csv",
        b"audiocap_id,youtube_id,start_time,caption\n1,aaaaaaaaaaa,0,ok\n2,bbbbbbbbbbb,0,caf\xe9\n",
    )
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["test"], "  checksums: null\n")
    with pytest.raises(AbortRun, match=r"test\.csv:3: non-UTF-8 byte 0xe9"):
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))


def test_checksum_mismatch(tmp_path: Path) -> None:
    csv_dir = write_csvs(tmp_path / "csv", GOOD)
    with open(csv_dir / "test.csv", "a") as fh:
        fh.write("6,eeeeeeeeeee,0,Added after the checksums\n")
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["train", "test"])
    with pytest.raises(AbortRun, match=r"test\.csv: checksum mismatch"):
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    assert not (tmp_path / "run" / "00-manifest").exists()


def test_shipped_checksums_match_shipped_csvs() -> None:
    from pipeline.io import file_digest
    from stages.manifest import read_checksums

    sums = read_checksums(REAL_CSV_DIR / "SHA256SUMS")
    assert set(sums) == {"train.csv", "val.csv", "test.csv"}
    for name, digest in sums.items():
        assert file_digest(REAL_CSV_DIR / name) == digest


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    rows = [(1, "bad", 0, "x"), (2, "aaaaaaaaaaa", -1, ""), (3, "bbbbbbbbbbb", 0, "fine")]
    csv_dir = write_csvs(tmp_path / "csv", {"test": rows})
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", csv_dir, ["test"])
    with pytest.raises(AbortRun) as err:
        run_stage(ManifestStage, ctx_for(cfg), RunOptions(progress=False))
    assert err.value.errors == [  # type: ignore[attr-defined]
        f"{csv_dir}/test.csv:2: malformed youtube_id 'bad' (expected 11 of [A-Za-z0-9_-])",
        f"{csv_dir}/test.csv:3: start_time '-1' is not a non-negative whole number of seconds",
        f"{csv_dir}/test.csv:3: empty caption",
    ]


def _files(folder: Path, splits: dict[str, str]) -> list[tuple[str, Path, bytes]]:
    return [(split, folder / name, (folder / name).read_bytes()) for split, name in splits.items()]


def _sorted(table: object) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: r["clip_id"])  # type: ignore[attr-defined]


def test_column_wise_reader_equals_the_row_by_row_reader_on_audiocaps() -> None:
    """Stage 0 reads valid CSVs column-wise (seconds for millions of rows) and falls back to the
    row-by-row reader only to name bad rows: both must build the same clips."""
    from stages.manifest import _fast_clips, _slow_clips

    files = _files(REAL_CSV_DIR, {"train": "train.csv", "val": "val.csv", "test": "test.csv"})
    fast = _fast_clips(files, 10)
    assert fast is not None and fast.num_rows == 51308
    assert _sorted(fast) == _sorted(_slow_clips(files, 10))


def test_column_wise_reader_on_odd_but_valid_text(tmp_path: Path) -> None:
    from stages.manifest import _fast_clips, _slow_clips

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "test.csv").write_bytes(
        "\ufeffaudiocap_id,youtube_id,start_time,caption\n"
        ' 7 ,aaaaaaaaaaa, 3.0 ,"  A dog\tbarks,  loudly "\n'
        "8,aaaaaaaaaaa,3,Une\u00a0voiture passe\n"
        "\n"
        "9,bbbbbbbbbbb,0,x\n".encode()
    )
    files = _files(folder, {"test": "test.csv"})
    fast = _fast_clips(files, 10)
    assert fast is not None
    assert _sorted(fast) == _sorted(_slow_clips(files, 10))
    row = _sorted(fast)[0]
    assert row["audio_captions"] == ["A dog barks, loudly", "Une voiture passe"]
    assert row["audiocap_ids"] == [7, 8]
