"""``avcaps robustness``: drops and bias index on synthetic predictions whose drops are known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from evalkit.metrics import METRICS, Scores, evaluate_sets, tokenize
from evalkit.robustness import bias_index, build_report, relative_drop
from pipeline.cli import main
from pipeline.errors import AbortRun
from standins.evalkit import write_predictions

pytestmark = pytest.mark.slow
GARBAGE = "zqxj vwkp"  # no token of it occurs in any reference: every n-gram metric is 0


@pytest.fixture(scope="module")
def subset(loo) -> tuple[dict[str, str], dict[str, list[str]]]:
    preds, refs = loo
    ids = list(refs)[:300]
    return {c: preds[c] for c in ids}, {c: refs[c] for c in ids}


def per_clip_cider(preds: dict[str, str], refs: dict[str, list[str]]) -> dict[str, float]:
    """pycocoevalcap's per-clip CIDEr-D (its IDF comes from the references only)."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = tokenize(refs), tokenize({c: [t] for c, t in preds.items()})
    _, scores = Cider().compute_score(gts, {c: res[c] for c in gts})
    return dict(zip(gts, scores, strict=True))


def test_bias_index_formula() -> None:
    assert bias_index([1.0], [0.0]) == (1.0, None)
    assert bias_index([0.0], [0.5]) == (-1.0, None)
    assert bias_index([0.3, 0.5], [0.4]) == (0.0, None)
    assert bias_index([-0.2], [0.2]) == (-1.0, None), "an improvement counts as no drop"
    assert bias_index([0.0], [-0.1])[0] is None
    assert relative_drop(0.8, 0.2) == pytest.approx(0.75) and relative_drop(0.0, 0.1) is None
    # The paper's Table 1 (CIDEr, LAVCap on AudioCaps) and Table 4 (on AudioVisualCaps).
    t1 = bias_index([relative_drop(0.805, x) for x in (0.333, 0.226, 0.140)],
                    [relative_drop(0.805, x) for x in (0.685, 0.674, 0.697, 0.566)])[0]  # fmt: skip
    t4 = bias_index([relative_drop(0.665, x) for x in (0.141, 0.136, 0.137)],
                    [relative_drop(0.665, x) for x in (0.018, 0.018, 0.020, 0.049)])[0]  # fmt: skip
    assert round(t1, 2) == 0.59 and round(t4, 2) == -0.10


def test_report_on_synthetic_predictions_with_known_drops(subset, tmp_path: Path) -> None:
    preds, refs = subset
    ids = list(refs)
    half = set(ids[: len(ids) // 2])
    sets = {
        "clean": preds,
        "visual_black": dict(preds),  # the model ignores the picture: no drop at all
        "visual_white": dict(preds),
        "visual_noise": dict(preds),
        "visual_shuffled": dict(preds),
        "audio_silent": {c: GARBAGE for c in ids},  # everything lost: drop 1
        "audio_gaussian": {c: GARBAGE if c in half else preds[c] for c in ids},  # half the clips lost
        "audio_shuffled": {c: preds[ids[(i + 1) % len(ids)]] for i, c in enumerate(ids)},
    }
    scores = evaluate_sets(sets, refs, spice_dir=tmp_path / "no-jars")
    report = build_report(scores)
    conds = report["conditions"]
    for cond in ("visual_black", "visual_white", "visual_noise", "visual_shuffled"):
        assert all(conds[cond]["drop"][m] == 0.0 for m in METRICS if m not in ("SPICE", "SPIDEr"))
    for m in ("BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr-D"):
        # BLEU's smoothing epsilon leaves ~1e-19 where there is no match at all.
        assert conds["audio_silent"]["metrics"][m] == pytest.approx(0.0, abs=1e-12)
        assert conds["audio_silent"]["drop"][m] == pytest.approx(1.0, abs=1e-12)
    # CIDEr-D and ROUGE-L are means over clips: losing half the clips loses exactly their share.
    per_clip = per_clip_cider(preds, refs)
    expected = sum(per_clip[c] for c in half) / sum(per_clip.values())
    assert conds["audio_gaussian"]["drop"]["CIDEr-D"] == pytest.approx(expected, rel=1e-9)
    assert 0.3 < expected < 0.7
    assert conds["audio_shuffled"]["drop"]["CIDEr-D"] > 0.5
    bias = report["bias"]
    assert bias["metric"] == "CIDEr-D" and "SPICE unavailable" in bias["why_metric"]
    assert bias["index"] == 1.0 and bias["drop_visual"] == 0.0
    assert bias["drop_audio"] == pytest.approx(
        (1.0 + expected + conds["audio_shuffled"]["drop"]["CIDEr-D"]) / 3
    )
    assert bias["per_kind"]["missing"]["index"] == 1.0
    assert conds["clean"]["metrics"]["SPICE"] is None and conds["clean"]["drop"] is None

    # A balanced model: the picture matters as much as the sound; known index from the drops.
    sets2 = {
        "clean": preds,
        "visual_black": {c: GARBAGE if c in half else preds[c] for c in ids},
        "audio_silent": {c: GARBAGE for c in ids},
    }
    report2 = build_report(evaluate_sets(sets2, refs, use_spice=False))
    assert report2["bias"]["index"] == pytest.approx((1 - expected) / (1 + expected), rel=1e-9)
    assert report2["bias"]["audio_conditions"] == ["audio_silent"]


def test_report_needs_clean() -> None:
    s = Scores(dict.fromkeys(METRICS, 0.5))
    with pytest.raises(AbortRun, match="clean"):
        build_report({"audio_silent": s})


def test_spider_is_the_bias_metric_when_spice_is_there() -> None:
    def s(cider: float, spice: float) -> Scores:
        return Scores(
            {**dict.fromkeys(METRICS, 0.5), "CIDEr-D": cider, "SPICE": spice, "SPIDEr": (cider + spice) / 2}
        )

    report = build_report({"clean": s(0.8, 0.2), "audio_silent": s(0.2, 0.05), "visual_black": s(0.8, 0.2)})
    assert report["bias"]["metric"] == "SPIDEr" and report["bias"]["why_metric"] is None
    assert report["bias"]["index"] == 1.0
    assert report["conditions"]["audio_silent"]["drop"]["SPIDEr"] == pytest.approx(0.75)


def test_cli_writes_markdown_json_png(subset, tmp_path: Path) -> None:
    preds, refs = subset
    ids = list(refs)
    refs_file = tmp_path / "refs.jsonl"
    refs_file.write_text("".join(json.dumps({"clip_id": c, "captions": refs[c]}) + "\n" for c in ids))
    pdir = tmp_path / "preds"
    pdir.mkdir()
    write_predictions(pdir / "clean.jsonl", preds)
    write_predictions(
        pdir / "visual_black.jsonl", {c: preds[ids[(i + 1) % len(ids)]] for i, c in enumerate(ids)}
    )
    write_predictions(pdir / "audio_silent.jsonl", {c: GARBAGE for c in ids})
    shuffled = tmp_path / "shuf.jsonl"
    write_predictions(shuffled, {c: preds[ids[(i + 7) % len(ids)]] for i, c in enumerate(ids)})
    out = tmp_path / "report"
    args = ["robustness", "--preds-dir", str(pdir), "--pred", f"audio_shuffled={shuffled}"]
    r = CliRunner().invoke(main, [*args, "--refs", str(refs_file), "--out", str(out), "--no-spice"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "robustness.json").read_text())
    assert list(report["conditions"]) == ["clean", "visual_black", "audio_silent", "audio_shuffled"]
    assert report["bias"]["metric"] == "CIDEr-D" and 0 < report["bias"]["index"] < 1
    md = (out / "robustness.md").read_text()
    assert "| Silent | Original |" in md and "Modality-bias index" in md and "CIDEr-D" in md
    with Image.open(out / "robustness.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    r = CliRunner().invoke(
        main, ["robustness", "--refs", str(refs_file), "--out", str(out), "--pred", "oops"]
    )
    assert r.exit_code == 2 and "CONDITION=FILE" in r.output
