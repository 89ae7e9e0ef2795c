"""``avcaps repair``: find the damaged files of a run folder and set them aside, never deleting one.

Per stage (in stage order, so an upstream stage is repaired before what reads it), under the
stage's lock (no run of it meanwhile): every ledger part is read whole; one that cannot be read
is moved to ``NN-stage/quarantine/`` with a note of why (:meth:`~pipeline.ledger.Ledger.quarantine`),
and so is a ``stats.json`` that is not valid JSON (the stage's next run writes it anew). The items
whose rows were in a quarantined part then have no row, or fall back to their earlier one (as if
that commit had never happened): the next run does the items without a row, and its stage checks
what it finds on disk as for any item to do (stage 1 decodes a file it reuses, stage 2 rewrites
its files), so no output of a lost row is trusted blindly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline.errors import AbortRun
from pipeline.ledger import QUARANTINE, DamagedPart, tolerating_damage
from pipeline.stage import ItemStage, RunContext, Stage


def _ids(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _quarantine_stats(stage: Stage) -> Path:
    dest_dir = stage.folder / QUARANTINE
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"stats-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    os.replace(stage.folder / "stats.json", dest)
    return dest


def _after(stage: Stage, parts: list[DamagedPart]) -> str:
    """What the items of a repaired stage are now."""
    from pipeline.selection import eligible_table, stage_ledger

    if not isinstance(stage, ItemStage):
        return f"rerun `avcaps run {stage.number}` to rebuild what the part held"
    with tolerating_damage():
        try:
            eligible = eligible_table(stage, stage.ctx, current_only=False)["clip_id"].to_pylist()
        except AbortRun:
            eligible = []
        state = stage_ledger(stage).latest_table(["status"])
    has_row = set(state["clip_id"].to_pylist())
    no_row = [c for c in eligible if c not in has_row]
    line = f"{len(no_row)} items have no row now (pending: the next run does them)"
    if all(p.clip_ids is not None for p in parts):
        held = sorted({c for p in parts for c in p.clip_ids or ()})
        back = [c for c in held if c in has_row]
        line += f"; the quarantined rows were of {len(held)} items ({_ids(held)})"
        if back:
            line += f", {len(back)} of which fall back to their earlier row"
    else:
        line += "; which items the quarantined rows were of cannot be read: any item whose newest row "
        line += "was there falls back to its earlier row, as if that commit had not happened"
    return line


def repair(ctx: RunContext, classes: list[type[Stage]]) -> list[str]:
    """Check and repair the stages ``classes`` of the run folder; the lines to print."""
    from pipeline.io import read_json
    from pipeline.locks import stage_lock
    from pipeline.selection import stage_ledger

    lines: list[str] = []
    for cls in sorted(classes, key=lambda c: c.number):
        stage = cls(ctx)
        ledger = stage_ledger(stage)
        if not stage.folder.exists():
            continue
        with stage_lock(stage.folder, cls.dirname(), None):
            ledger.recover()
            damaged = ledger.check()
            for part in damaged:
                text = part.describe(ctx.workdir)
                dest = ledger.quarantine(part)
                where = dest.relative_to(ctx.workdir)
                lines.append(f"{cls.dirname()}: damaged part {text}; moved to {where}")
            _, stats_problem = read_json(stage.folder / "stats.json")
            if stats_problem:
                dest = _quarantine_stats(stage)
                lines.append(
                    f"{cls.dirname()}: {stats_problem}; moved to {dest.relative_to(ctx.workdir)} (the "
                    "stage's next run writes it anew)"
                )
        if damaged:
            lines.append(f"{cls.dirname()}: {_after(stage, damaged)}")
    if not lines:
        lines.append(f"{ctx.workdir}: every ledger part and stats.json reads whole; nothing to repair")
    return lines
