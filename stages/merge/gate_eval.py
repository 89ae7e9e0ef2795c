"""How well the merge gate agrees with people: the gate run over a labelled set of answers.

A labelled set is JSON Lines, one answer per line: ``audio`` (one AudioCaps caption, or a list for
the all-captions form), ``visual``, ``answer`` (the raw LLM answer), ``finish_reason`` and
``expected`` (the verdict a reviewer gives: ``ok`` or the gate reason that applies first), plus
``id``, ``split`` and a ``note``. The project's own set is ``tests/merge/gate_set.jsonl``.

The gate is scored as a detector of bad answers: *precision* is the share of the answers it
rejects that a reviewer rejects too, *recall* the share of the answers a reviewer rejects that it
rejects. *Agreement* is the share of answers on which it takes the reviewer's decision
(accept/reject), *reason agreement* the share where it also names the reviewer's reason.

    python -m stages.merge.gate_eval tests/merge/gate_set.jsonl [--set merge.max_invented=0.3]

prints those figures per split (the README's table) and every answer the gate gets wrong, so the
thresholds can be tuned on a set of one's own.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.merge.gate import GateSettings, Verdict, check_answer


def load_set(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                missing = {"audio", "visual", "answer", "expected"} - set(row)
                if missing:
                    raise KeyError(f"missing {sorted(missing)}")
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{n}: {type(exc).__name__}: {exc}") from exc
            rows.append(row)
    return rows


@dataclass
class Scores:
    """The gate's figures on some rows of a labelled set."""

    rows: int = 0
    agree: int = 0  # same decision (accept / reject)
    agree_reason: int = 0  # same decision and, on a rejection, the same reason
    rejected: int = 0  # by the gate
    bad: int = 0  # rejected by the reviewer
    caught: int = 0  # rejected by both
    per_reason: Counter[str] = field(default_factory=Counter)  # reviewer's reason: rows
    per_reason_caught: Counter[str] = field(default_factory=Counter)  # ... of them the gate rejected
    wrong: list[tuple[dict[str, Any], Verdict]] = field(default_factory=list)

    def add(self, row: dict[str, Any], v: Verdict) -> None:
        expected_bad = row["expected"] != "ok"
        self.rows += 1
        self.per_reason[row["expected"]] += 1
        self.bad += expected_bad
        self.rejected += not v.ok
        if expected_bad and not v.ok:
            self.caught += 1
            self.per_reason_caught[row["expected"]] += 1
        if expected_bad != v.ok:
            self.agree += 1
        if v.reason == row["expected"]:
            self.agree_reason += 1
        else:
            self.wrong.append((row, v))

    @property
    def precision(self) -> float:
        return self.caught / self.rejected if self.rejected else 1.0

    @property
    def recall(self) -> float:
        return self.caught / self.bad if self.bad else 1.0

    @property
    def agreement(self) -> float:
        return self.agree / self.rows if self.rows else 1.0

    @property
    def reason_agreement(self) -> float:
        return self.agree_reason / self.rows if self.rows else 1.0


def score(rows: list[dict[str, Any]], settings: GateSettings) -> dict[str, Scores]:
    """Scores per split and over all rows (key ``all``)."""
    out: dict[str, Scores] = {}
    for row in rows:
        v = check_answer(row["answer"], row["audio"], row["visual"], settings, row.get("finish_reason"))
        for key in (row.get("split", "all"), "all"):
            out.setdefault(key, Scores()).add(row, v)
    return out


def table(scores: dict[str, Scores]) -> str:
    """The Markdown table the README quotes."""
    lines = [
        "| rows | answers | reviewer rejects | gate precision | gate recall | agreement | reason agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, s in sorted(scores.items(), key=lambda kv: kv[0] == "all"):
        lines.append(
            f"| {key} | {s.rows} | {s.bad} | {s.precision:.3f} | {s.recall:.3f} | "
            f"{s.agreement:.3f} | {s.reason_agreement:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from pipeline.config import apply_overrides
    from stages.merge.config import MergeConfig, gate_settings

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("labelled_set", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="merge.KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = MergeConfig.model_validate(apply_overrides({}, args.overrides).get("merge", {}))
    scores = score(load_set(args.labelled_set), gate_settings(cfg))
    print(table(scores))
    s = scores["all"]
    print("\nreviewer's verdict: rows, of them rejected by the gate")
    for reason, n in sorted(s.per_reason.items()):
        rejected = s.per_reason_caught[reason] if reason != "ok" else s.rejected - s.caught
        print(f"  {reason:15s} {n:4d} {rejected:4d}")
    print(f"\n{len(s.wrong)} answers where the gate's verdict or reason differs from the reviewer's:")
    for row, v in s.wrong:
        extra = f" {v.invented}" if v.invented else ""
        print(
            f"  {row.get('id')}: expected {row['expected']}, gate {v.reason}{extra} ({row.get('note', '')})"
        )


if __name__ == "__main__":
    main()
