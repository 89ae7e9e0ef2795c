"""The gate against people, on a labelled set of real AudioCaps captions (``gate_set.jsonl``).

Each row: an AudioCaps caption (or a clip's five, for the all-captions form) taken from
``manifests/audiocaps/*.csv`` by its ``audiocap_id``, a visual caption in BLIP-2's style, an LLM
answer written to exercise one verdict (good merges that paraphrase, chat around a clean caption,
inventions, dropped sounds or sights, cut-off and malformed answers...), the model's
``finish_reason``, and the verdict a reviewer gives (``ok`` or the gate reason that applies first).

Three splits, written in turn: ``dev`` (93 rows, the thresholds and allowances were tuned on
them), ``check`` (95 rows, written with the gate frozen; their first run found the "note:"
trailer never matched and the audio overlap counting words kept for the picture, both fixed),
``held_out`` (50 rows, written after that and never tuned on; its first run found "I'm unable"
missing from the refusal patterns, fixed since: a reason-only change, the answer was rejected).

Measured at commit with the default thresholds (``python -m stages.merge.gate_eval
tests/merge/gate_set.jsonl``): agreement 0.979 over all 238 rows (5 answers decided otherwise than
by the reviewer), 0.960 on held_out; precision 0.981, recall 0.972. The test asserts 0.95 overall
(at most 11 answers decided wrongly: a change that costs 7 more rows fails) and 0.90 on held_out
(at most 5 of 50), precision and recall of 0.95 each, and 0.90 reason agreement.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from stages.merge.config import MergeConfig, gate_settings
from stages.merge.gate import REASONS
from stages.merge.gate_eval import Scores, load_set, score, table

REPO = Path(__file__).resolve().parents[2]
GATE_SET = Path(__file__).with_name("gate_set.jsonl")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return load_set(GATE_SET)


@pytest.fixture(scope="module")
def scores(rows: list[dict]) -> dict[str, Scores]:
    return score(rows, gate_settings(MergeConfig()))


def wrong(s: Scores) -> str:
    return "\n".join(
        f"{r['id']}: expected {r['expected']}, gate {v.reason} ({r['note']})" for r, v in s.wrong
    )


def test_the_set_is_real_captions_covering_every_verdict(rows: list[dict]) -> None:
    captions: dict[int, str] = {}
    for split in ("train", "val", "test"):
        with open(REPO / "manifests/audiocaps" / f"{split}.csv", newline="", encoding="utf-8") as fh:
            captions |= {int(r["audiocap_id"]): r["caption"] for r in csv.DictReader(fh)}
    assert len(rows) >= 150 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        audio = r["audio"] if isinstance(r["audio"], list) else [r["audio"]]
        assert audio == [captions[i] for i in r["audiocap_ids"]], r["id"]
        assert r["expected"] in REASONS and r["finish_reason"] in ("stop", "length"), r["id"]
    assert {r["expected"] for r in rows} == set(REASONS)  # every verdict the gate gives
    assert {r["split"] for r in rows} == {"dev", "check", "held_out"}
    for split in ("dev", "check", "held_out"):
        part = [r for r in rows if r["split"] == split]
        assert sum(isinstance(r["audio"], list) for r in part) >= 4, split  # the all-captions form
        assert sum(r["expected"] == "ok" for r in part) >= len(part) // 3, split


def test_the_gate_agrees_with_the_reviewers(scores: dict[str, Scores]) -> None:
    s = scores["all"]
    assert s.agreement >= 0.95 and s.precision >= 0.95 and s.recall >= 0.95, wrong(s)
    assert s.reason_agreement >= 0.90, wrong(s)
    assert scores["held_out"].agreement >= 0.90, wrong(scores["held_out"])


def test_readme_states_the_measured_figures(scores: dict[str, Scores]) -> None:
    readme = (REPO / "README.md").read_text()
    for line in table(scores).splitlines():
        assert line in readme, f"README.md lacks the gate figure line {line!r}: run the eval and update it"
