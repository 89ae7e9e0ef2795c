"""Quality scores in the export (raw, run percentiles, the visual-caption filter) and the card's
figures, on run folders whose stages 3 and 4 wrote score columns with their own schemas."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from stages.caption.stage import CaptionStage
from stages.export.variants import concat
from stages.merge.stage import MergeStage
from standins.contract_run import ContractRun, build_contract_run
from tests.export.conftest import BASE_FAILURES, BASE_VERDICTS, REPO

SCORED_LISTS = ("visual_clip_score", "merge_clap_score", "merge_clip_score", "source_audio_clap_score")
VARIANT_SPLITS = {"train": "train", "val": "validation"}  # split column -> HF split


@pytest.fixture(scope="session")
def scored_contract(tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    """The base run with scores in stages 3 and 4, except for one train clip and one test clip
    whose rows were made before scoring existed."""
    old = os.getcwd()
    os.chdir(REPO)
    try:
        workdir = tmp_path_factory.mktemp("scored") / "run"
        return build_contract_run(
            workdir,
            failures=BASE_FAILURES,
            verdicts=BASE_VERDICTS,
            scores=True,
            unscored={("train", 2), ("test", 4)},
        )
    finally:
        os.chdir(old)


@pytest.fixture
def scored_copy(scored_contract: ContractRun, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(scored_contract.workdir, dest)
    return dest


def rows_of(export: Path, config: str) -> dict[str, dict[str, Any]]:
    """clip_id -> row of every split of one config."""
    out = {}
    for path in sorted((export / "data" / config).glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            out[row["clip_id"]] = row
    return out


def share_at_or_below(x: float, population: list[float]) -> float:
    return 100.0 * sum(1 for v in population if v <= x) / len(population)


def test_export_carries_raw_scores_and_percentiles_over_the_export(
    scored_copy: Path, scored_contract: ContractRun, export: Callable[..., Path]
) -> None:
    from pipeline.selection import stage_ledger

    folder = export(scored_copy)
    rows = rows_of(folder, "and")
    for config in ("random", "concat", "per_modality"):
        other = rows_of(folder, config)
        assert set(other) == set(rows)
        for cid, row in other.items():
            for col in (*SCORED_LISTS, "merge_clap_percentile", "visual_caption_clip_percentile"):
                assert row[col] == rows[cid][col]
    merges = stage_ledger(MergeStage, scored_copy).latest()
    captions = stage_ledger(CaptionStage, scored_copy).latest()
    test_ids = [c for c, r in rows.items() if r["split"] == "test"]
    unscored = {scored_contract.ids("train")[2], scored_contract.ids("test")[4]}
    scored_test = [c for c in test_ids if c not in unscored]
    assert scored_test and unscored <= set(rows)
    # Raw: the ledgers' float32 values, aligned with the exported captions.
    for cid in scored_test:
        assert rows[cid]["merge_clap_score"] == pytest.approx(list(merges.at[cid, "merge_clap_score"]))
        assert len(rows[cid]["merge_clap_score"]) == len(rows[cid]["merged_captions"])
        assert len(rows[cid]["source_audio_clip_score"]) == len(rows[cid]["audio_captions"])
        assert rows[cid]["source_visual_clip_score"] == pytest.approx(
            merges.at[cid, "source_visual_clip_score"]
        )
    for cid, row in rows.items():
        if cid not in unscored:
            assert row["visual_clip_score"] == pytest.approx(list(captions.at[cid, "visual_clip_score"]))
            # the visual caption is the middle frame's (caption.caption_frame: middle)
            if row["visual_caption"]:
                assert row["visual_caption_clip_score"] == pytest.approx(row["visual_clip_score"][1])
    # Percentiles: the share of the column's values over every exported clip (lists flattened).
    for col in (
        "merge_clap_score",
        "visual_clip_score",
        "source_visual_clap_score",
        "visual_caption_clip_score",
    ):
        pct = col.removesuffix("_score") + "_percentile"
        population = [
            v
            for r in rows.values()
            for v in (r[col] if isinstance(r[col], list) else [r[col]]) or []
            if v is not None
        ]
        assert population
        for row in rows.values():
            if row[col] is None:
                assert row[pct] is None
                continue
            got = row[pct] if isinstance(row[pct], list) else [row[pct]]
            want = [
                share_at_or_below(v, population)
                for v in (row[col] if isinstance(row[col], list) else [row[col]])
            ]
            assert got == pytest.approx(want, abs=1e-4), (col, row["clip_id"])
    # Rows from before scoring existed: nulls everywhere, nothing dropped, the export still works.
    for cid in unscored:
        row = rows[cid]
        assert all(row[c] is None for c in row if c.endswith(("_score", "_percentile")))
        assert row["visual_caption_dropped"] is False and row["score_models"] is None
    assert (
        rows[scored_test[0]]["score_models"] and rows[scored_test[0]]["clip_model"] == "standin/tiny-clip@r0"
    )


def test_min_visual_clip_percentile_drops_poor_visual_captions_from_the_variants(
    scored_copy: Path, scored_contract: ContractRun, export: Callable[..., Path]
) -> None:
    import json

    folder = export(scored_copy, "export.min_visual_clip_percentile=60")
    by_config = {c: rows_of(folder, c) for c in ("random", "concat", "and", "per_modality")}
    rows = by_config["and"]
    expected: dict[str, dict[str, int]] = {}
    for cid, row in rows.items():
        pct = row["visual_caption_clip_percentile"]
        in_variant = row["split"] in VARIANT_SPLITS and bool(row["visual_caption"])
        drop = in_variant and pct is not None and pct < 60
        assert row["visual_caption_dropped"] is drop, cid
        if in_variant:
            new = {"visual_captions": 0, "dropped": 0, "unscored": 0}
            c = expected.setdefault(VARIANT_SPLITS[row["split"]], new)
            c["visual_captions"] += 1
            c["dropped"] += drop
            c["unscored"] += pct is None
        visual = row["visual_caption"]
        refs = {cfg: by_config[cfg][cid]["captions"] for cfg in by_config}
        sources = {cfg: by_config[cfg][cid]["caption_sources"] for cfg in by_config}
        if drop:  # every variant as with an empty visual caption; the column keeps the caption
            assert visual
            assert sources["random"] == ["audio"] * len(row["audio_captions"])
            assert refs["random"] == row["audio_captions"]
            assert refs["and"] == row["audio_captions"]
            assert refs["concat"] == [concat(a, "") for a in row["audio_captions"]]
            assert refs["per_modality"] == row["audio_captions"]
        elif in_variant:  # kept: the visual caption is in the references
            assert all(visual.rstrip(".") in r or visual[1:].rstrip(".") in r for r in refs["and"])
            assert refs["per_modality"][-1] == visual
    assert sum(c["dropped"] for c in expected.values()) >= 2  # the threshold did bite
    assert expected["train"]["unscored"] == 1  # the clip from before scoring: kept
    stats = json.loads((folder / "statistics.json").read_text())
    assert stats["visual_filter"] == {"min_visual_clip_percentile": 60.0, "splits": expected}
    card = (folder / "README.md").read_text()
    for split, c in expected.items():
        line = f"{split}: **{c['dropped']} of {c['visual_captions']}** visual captions dropped"
        assert line in card
    assert "(1 without a score, kept)" in card
    # The test split's references are the reviewed merges: never filtered.
    assert not any(r["visual_caption_dropped"] for r in rows.values() if r["split"] == "test")
    # Off by default: nothing dropped, and the card says so.
    folder = export(scored_copy)
    assert not any(r["visual_caption_dropped"] for r in rows_of(folder, "and").values())
    assert "`export.min_visual_clip_percentile` off" in (folder / "README.md").read_text()


def test_export_of_a_run_without_scores(run_copy: Callable[..., Path], export: Callable[..., Path]) -> None:
    """Scoring off (or a run from before scoring existed): null columns, the filter finds nothing
    to judge by and drops nothing, no score figure, and the card says so."""
    folder = export(run_copy(), "export.min_visual_clip_percentile=90")
    rows = rows_of(folder, "random")
    assert rows
    for row in rows.values():
        assert all(row[c] is None for c in row if c.endswith(("_score", "_percentile")))
        assert row["visual_caption_dropped"] is False
    card = (folder / "README.md").read_text()
    assert "**No clip in this export has scores.**" in card
    assert "**0 of" in card and "without a score, kept" in card
    assert not (folder / "figures" / "scores.png").exists()
    assert (folder / "figures" / "caption_lengths.png").is_file()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_card_figures_exist_are_pngs_linked_from_the_card_and_deterministic(
    scored_copy: Path, export: Callable[..., Path]
) -> None:
    from PIL import Image

    folder = export(scored_copy)
    card = (folder / "README.md").read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert links == [
        "figures/caption_lengths.png",
        "figures/scores.png",
        "figures/availability.png",
        "figures/review_verdicts.png",
    ]
    sums = (folder / "SHA256SUMS").read_text()
    first = {}
    for link in links:
        path = folder / link  # relative to the card: what the Hub renders
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            assert img.size[0] >= 500 and img.size[1] >= 250
            assert not {"Software", "Creation Time", "date:create"} & set(img.info)  # no churn fields
        assert f"  {link}\n" in sums
        first[link] = data
    assert not list(folder.glob("figures/.tmp*")) and not list(folder.glob("figures/*.tmp"))
    again = export(scored_copy)
    assert {link: (again / link).read_bytes() for link in links} == first  # same data, same bytes


def test_no_review_no_verdict_figure_and_figures_can_be_turned_off(
    tmp_path: Path, export: Callable[..., Path]
) -> None:
    run = build_contract_run(tmp_path / "run", sample_per_split=3, review_default=None, verdicts={})
    folder = export(run.workdir, "export.allow_unreviewed=true")
    assert sorted(p.name for p in (folder / "figures").iterdir()) == [
        "availability.png",
        "caption_lengths.png",
    ]
    assert "review_verdicts.png" not in (folder / "README.md").read_text()
    folder = export(run.workdir, "export.allow_unreviewed=true", "export.figures=false")
    assert not (folder / "figures").exists()
    assert "No figures in this export" in (folder / "README.md").read_text()
