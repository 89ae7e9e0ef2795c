"""``avcaps eval``: the numbers are pycocoevalcap's, on the real AudioCaps test captions."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from evalkit.data import read_predictions, read_references
from evalkit.metrics import METRICS, evaluate
from pipeline.cli import main
from pipeline.errors import AbortRun
from standins.evalkit import AUDIOCAPS_TEST, write_jsonl
from standins.evalkit import write_predictions as write_preds

pytestmark = pytest.mark.slow


def direct_pycocoevalcap(
    preds: dict[str, str], refs: dict[str, list[str]], meteor: bool = True
) -> dict[str, float]:
    """What the captioning literature runs: COCOEvalCap's steps, fresh scorer objects (METEOR's
    start costs 10-20 s, so only the first test asks for it)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {}
    if meteor:
        scorer = Meteor()
        out["METEOR"] = scorer.compute_score(gts, res)[0]
        del scorer
    return out | {
        "BLEU-1": bleu[0],
        "BLEU-4": bleu[3],
        "ROUGE-L": Rouge().compute_score(gts, res)[0],
        "CIDEr-D": Cider().compute_score(gts, res)[0],
    }


@pytest.fixture(scope="module")
def reference_scores(loo: tuple[dict[str, str], dict[str, list[str]]]) -> dict[str, float]:
    return direct_pycocoevalcap(*loo)


def test_scores_equal_direct_pycocoevalcap_on_975_clips(loo, reference_scores, tmp_path: Path) -> None:
    preds, refs = loo
    scores = evaluate(preds, refs, spice_dir=tmp_path / "no-jars")
    for metric, expected in reference_scores.items():
        assert scores.values[metric] == expected, metric
    # Leave-one-out human captions: plausible, far from degenerate values.
    assert 0.5 < scores.values["CIDEr-D"] < 1.5
    assert 0.2 < scores.values["METEOR"] < 0.4
    assert scores.counts == {"matched": 975, "missing": 0, "extra": 0}
    # A second call reuses the METEOR process and gives the same numbers.
    again = evaluate(preds, refs, spice_dir=tmp_path / "no-jars")
    assert again.values == scores.values


def test_spice_unavailable_is_reported_never_a_number(loo, tmp_path: Path) -> None:
    preds, refs = loo
    sub = dict(list(refs.items())[:50])
    scores = evaluate(preds, sub, allow_missing=False, spice_dir=tmp_path / "empty")
    assert scores.values["SPICE"] is None and scores.values["SPIDEr"] is None
    assert "jars not found" in scores.unavailable["SPICE"]
    assert "fetch-spice" in scores.unavailable["SPICE"]
    assert "SPIDEr" in scores.unavailable
    # Jars that do not match the recorded checksums are not used either.
    d = tmp_path / "tampered"
    d.mkdir()
    for jar in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (d / jar).write_bytes(b"not a jar")
    (d / "SHA256SUMS").write_text("0" * 64 + "  stanford-corenlp-3.6.0.jar\n")
    scores = evaluate(preds, sub, spice_dir=d)
    assert scores.values["SPICE"] is None and "does not match" in scores.unavailable["SPICE"]


def test_missing_and_extra_ids(loo) -> None:
    preds, refs = loo
    ids = list(refs)
    some = {c: preds[c] for c in ids[:-3]} | {"not_a_clip_0_10000": "a dog barks"}
    with pytest.raises(AbortRun, match=r"3 of 975 reference clips have no prediction.*--allow-missing"):
        evaluate(some, refs, use_spice=False)
    scores = evaluate(some, refs, allow_missing=True, use_spice=False)
    assert scores.counts == {"matched": 972, "missing": 3, "extra": 1}
    expected = direct_pycocoevalcap(preds, {c: refs[c] for c in ids[:-3]}, meteor=False)
    assert scores.values["CIDEr-D"] == expected["CIDEr-D"]
    assert scores.values["BLEU-4"] == expected["BLEU-4"]
    with pytest.raises(AbortRun, match="no prediction matches"):
        evaluate({"x_0_10000": "a"}, refs, use_spice=False)


def test_cli_reads_every_reference_format_and_prints_all_formats(loo, tmp_path: Path) -> None:
    preds, refs = loo
    ids = list(refs)[:40]
    pred_file = write_preds(tmp_path / "p.jsonl", {c: preds[c] for c in ids})
    # An export folder as the export stage writes it: data/<config>/test-*.parquet, a captions list.
    data = tmp_path / "run" / "export" / "data" / "default"
    data.mkdir(parents=True)
    for k, chunk in enumerate((ids[:25], ids[25:])):
        table = pa.table(
            {"clip_id": chunk, "captions": [refs[c] for c in chunk], "image": [b"x"] * len(chunk)}
        )
        pq.write_table(table, data / f"test-{k:05d}-of-00002.parquet")
    # A second config (another training variant) with the same test references, as the export has.
    (data.parent / "concat").mkdir()
    for f in data.iterdir():
        (data.parent / "concat" / f.name).write_bytes(f.read_bytes())
    jsonl = write_jsonl(tmp_path / "r.jsonl", [{"clip_id": c, "captions": refs[c]} for c in ids])
    csv_refs = tmp_path / "r.csv"
    csv_refs.write_text("clip_id,caption\n" + "".join(f'{c},"{r}"\n' for c in ids for r in refs[c]))
    sources = [
        tmp_path / "run",
        tmp_path / "run" / "export",
        data / "test-00000-of-00002.parquet",
        jsonl,
        csv_refs,
    ]
    loaded = [read_references(s) for s in sources]
    assert loaded[0] == loaded[1] == loaded[3] == loaded[4] == {c: refs[c] for c in ids}
    assert set(loaded[2]) == set(ids[:25])
    assert read_references(tmp_path / "run", config_name="concat") == loaded[0]
    pq.write_table(
        pa.table({"clip_id": ids[:3], "captions": [["other"]] * 3}),
        data.parent / "concat" / "test-00000-of-00002.parquet",
    )
    with pytest.raises(AbortRun, match="differ; choose one with --config-name"):
        read_references(tmp_path / "run")
    assert read_references(tmp_path / "run", config_name="default") == loaded[0]
    with pytest.raises(AbortRun, match="no config 'nope'"):
        read_references(tmp_path / "run", config_name="nope")
    with pytest.raises(AbortRun, match="no val-"):
        read_references(tmp_path / "run", split="val")

    runner = CliRunner()
    out = tmp_path / "scores.json"
    args = ["eval", str(pred_file), "--refs", str(tmp_path / "run"), "--config-name", "default"]
    r = runner.invoke(main, [*args, "--format", "json", "--output", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == set(METRICS)
    assert report["counts"] == {"matched": 40, "missing": 0, "extra": 0}
    assert report["metrics"]["SPICE"] is None
    direct = direct_pycocoevalcap({c: preds[c] for c in ids}, {c: refs[c] for c in ids}, meteor=False)
    assert report["metrics"]["CIDEr-D"] == direct["CIDEr-D"]
    r = runner.invoke(main, ["eval", str(pred_file), "--refs", str(jsonl), "--format", "markdown"])
    assert r.exit_code == 0 and "| CIDEr-D |" in r.output and "40 matched" in r.output
    # Missing clips: exit 2 with the reason, unless --allow-missing.
    r = runner.invoke(main, ["eval", str(pred_file), "--refs", str(AUDIOCAPS_TEST)])
    assert r.exit_code == 2 and "935 of 975 reference clips have no prediction" in r.output
    r = runner.invoke(main, ["eval", str(pred_file), "--refs", str(AUDIOCAPS_TEST), "--allow-missing"])
    assert r.exit_code == 0 and "40 matched, 935 missing, 0 extra" in r.output


def test_audiocaps_csv_references_are_the_five_captions() -> None:
    refs = read_references(AUDIOCAPS_TEST)
    assert len(refs) == 975 and all(len(v) == 5 for v in refs.values())


def test_bad_prediction_files_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"clip_id": "a", "caption": "x"}\n{"clip_id": "a", "caption": "y"}\n')
    with pytest.raises(AbortRun, match=r"p.jsonl:2: clip a already has a prediction"):
        read_predictions(p)
    p.write_text('{"clip_id": "a", "caption": "x"}\nnot json\n')
    with pytest.raises(AbortRun, match=r"p.jsonl:2: not valid JSON"):
        read_predictions(p)
    c = tmp_path / "p.csv"
    c.write_text("id,text\na,b\n")
    with pytest.raises(AbortRun, match="clip_id,caption"):
        read_predictions(c)
    c.write_text("clip_id,caption\na,a dog barks\nb,\n")
    assert read_predictions(c) == {"a": "a dog barks", "b": ""}


def test_empty_and_punctuation_only_predictions_score_like_pycocoevalcap(loo) -> None:
    """A model may say nothing; the tokenizer keeps its (empty) line and the clip scores low."""
    preds, refs = loo
    ids = list(refs)[:60]
    some = {c: ("" if i % 10 == 0 else "..." if i % 10 == 1 else preds[c]) for i, c in enumerate(ids)}
    sub = {c: refs[c] for c in ids}
    scores = evaluate(some, sub, use_spice=False)
    direct = direct_pycocoevalcap(some, sub, meteor=False)
    assert all(scores.values[m] == direct[m] for m in direct)
    assert scores.counts["matched"] == 60
