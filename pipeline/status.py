"""``avcaps status``: every stage at a glance, as a table or as JSON for dashboards.

The JSON shape is an interface (cluster scripts read it): add keys, never rename them.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.registry import stage_classes
from pipeline.stage import STATUSES, ItemStage, RunContext, Stage

if TYPE_CHECKING:
    import pandas as pd


def _counts(ids: list[str], state: pd.DataFrame) -> dict[str, Any]:
    import pandas as pd

    current = state.reindex(pd.Index(ids, dtype="object"))
    status = current["status"].fillna("pending") if "status" in current else pd.Series("pending", ids)
    counts = {k: int(v) for k, v in status.value_counts().items()}
    failed = current[status.isin(["failed_permanent", "failed_transient"]) & current["reason"].notna()]
    reasons = {str(k): int(v) for k, v in failed["reason"].value_counts().sort_index().items() if k}
    return {**{k: counts.get(k, 0) for k in STATUSES}, "reasons": reasons}


def stage_status(cls: type[Stage], ctx: RunContext) -> dict[str, Any]:
    from pipeline.runner import eligible_items, stage_ledger

    stage = cls(ctx)
    entry: dict[str, Any] = {"stage": cls.dirname(), **dict.fromkeys(STATUSES, 0), "reasons": {}}
    stats_file = stage.folder / "stats.json"
    if isinstance(stage, ItemStage):
        state = stage_ledger(stage).latest()
        try:
            eligible = eligible_items(stage, ctx)
        except AbortRun:  # upstream has not run: nothing is eligible yet
            entry["waiting_for_upstream"] = True
            return entry
        ids = list(eligible.index)
        entry.update(_counts(ids, state))
        if "split" in eligible.columns:
            entry["by_split"] = {
                str(split): _counts(list(group.index), state)
                for split, group in eligible.groupby("split", sort=True)
            }
    else:
        ledger = stage_ledger(stage)
        if ledger.exists():
            state = ledger.latest()
            entry.update(_counts(list(state.index), state))
            if "split" in state.columns:
                per_split = state["split"].value_counts().sort_index()
                entry["by_split"] = {str(k): int(v) for k, v in per_split.items()}
        entry["done"] = stats_file.exists()
    if stats_file.exists():
        stats = json.loads(stats_file.read_text())
        for key in ("last_run", "summary"):
            if key in stats:
                entry[key] = stats[key]
    return entry


def run_status(ctx: RunContext) -> dict[str, Any]:
    return {"workdir": str(ctx.workdir), "stages": [stage_status(c, ctx) for c in stage_classes()]}


def format_table(status: dict[str, Any]) -> str:
    head = f"{'stage':<14}{'ok':>9}{'failed_perm':>13}{'failed_trans':>14}{'pending':>9}  notes"
    lines = [f"run folder: {status['workdir']}", head, "-" * len(head)]
    for st in status["stages"]:
        notes = []
        if st.get("waiting_for_upstream"):
            notes.append("waiting for upstream")
        if "done" in st:
            notes.append("done" if st["done"] else "not run")
        if st["reasons"]:
            notes.append(", ".join(f"{k}={v}" for k, v in st["reasons"].items()))
        lines.append(
            f"{st['stage']:<14}{st['ok']:>9}{st['failed_permanent']:>13}"
            f"{st['failed_transient']:>14}{st['pending']:>9}  {'; '.join(notes)}"
        )
        by_split = st.get("by_split")
        if by_split and isinstance(next(iter(by_split.values())), dict):
            for split, c in by_split.items():
                why = ", ".join(f"{k}={v}" for k, v in c["reasons"].items())
                lines.append(
                    f"  {split:<12}{c['ok']:>9}{c['failed_permanent']:>13}"
                    f"{c['failed_transient']:>14}{c['pending']:>9}  {why}"
                )
    return "\n".join(lines)
