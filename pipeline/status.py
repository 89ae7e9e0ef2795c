"""``avcaps status``: every stage at a glance, as a table or as JSON for dashboards.

The JSON shape is an interface (cluster scripts read it): add keys, never rename them. Status only
reads (ledgers, ``stats.json``, the run logs' names); it reads just the columns it counts, so it
stays fast on millions of clips, and it never takes a lock or changes a file. A damaged ledger
part or ``stats.json`` is named (``damaged_parts``, ``stats_damaged``) and the rest is counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.executors import KEPT_PREVIOUS
from pipeline.io import read_json
from pipeline.ledger import QUARANTINE, DamagedPart, tolerating_damage
from pipeline.registry import app, stage_classes
from pipeline.selection import (
    Expected,
    eligible_table,
    expected,
    has_legacy,
    held_back,
    stage_ledger,
    waiting_line,
)
from pipeline.stage import STATUSES, ItemStage, RunContext, Stage, WholeStage

if TYPE_CHECKING:
    import pyarrow as pa


def group_column() -> str | None:
    """The clip-table column whose values counts are also given per (the application's
    ``GROUP_COLUMN``; none when it declares none). The JSON key stays ``by_split``: an interface."""
    return getattr(app(), "GROUP_COLUMN", None)


def _counts(status: pa.Array, reason: pa.Array) -> dict[str, Any]:
    """Counts by status and, among failed items, by reason (Arrow, so millions of clips are cheap)."""
    import pyarrow.compute as pc

    counts = {str(v["values"]): int(v["counts"]) for v in pc.value_counts(status).to_pylist()}
    failed = pc.and_(
        pc.is_in(status, value_set=pa_strings(["failed_permanent", "failed_transient"])),
        pc.and_(pc.is_valid(reason), pc.not_equal(reason.fill_null(""), "")),
    )
    why = pc.value_counts(reason.filter(failed)).to_pylist()
    reasons = {str(v["values"]): int(v["counts"]) for v in sorted(why, key=lambda v: str(v["values"]))}
    return {**{k: counts.get(k, 0) for k in STATUSES}, "reasons": reasons}


def pa_strings(values: list[str]) -> pa.Array:
    import pyarrow as pa

    return pa.array(values, pa.string())


def _current(eligible: pa.Table, state: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Status (``pending`` where no row) and reason of each eligible clip."""
    import pyarrow.compute as pc

    idx = pc.index_in(eligible["clip_id"], value_set=state["clip_id"].combine_chunks())
    status = state["status"].combine_chunks().take(idx).fill_null("pending")
    return status, state["reason"].combine_chunks().take(idx)


def _stale(eligible: pa.Table, state: pa.Table, exp: Expected) -> tuple[pa.Array, pa.Array]:
    """Per eligible clip: its row is ok but was made from other settings or other values of what
    it reads than a run would use today (a null fingerprint, from before fingerprints, counts as
    current); and, among current rows, its layer (scores) is not the one a run would make."""
    import pyarrow.compute as pc

    from pipeline.fingerprint import PREFIX

    idx = pc.index_in(eligible["clip_id"], value_set=state["clip_id"].combine_chunks())
    ok = pc.equal(state["status"].combine_chunks().take(idx), "ok").fill_null(False)
    actual = state["fingerprint"].combine_chunks().take(idx)
    current = exp.current(actual).fill_null(True)
    stale = pc.and_(ok, pc.invert(current))
    have = state["layer_fingerprint"].combine_chunks().take(idx)
    differs = pc.or_(pc.is_null(have), pc.not_equal(have, exp.layer)).fill_null(True)
    fresh = pc.starts_with(actual, PREFIX).fill_null(False)
    layer = pc.and_(pc.and_(pc.and_(ok, current), fresh), pc.and_(pc.is_valid(exp.layer), differs))
    return stale, layer.fill_null(False)


def _by_group(groups: pa.Array, status: pa.Array, reason: pa.Array) -> dict[str, Any]:
    import pyarrow.compute as pc

    out = {}
    for g in sorted(str(v) for v in pc.unique(groups.drop_null()).to_pylist()):
        mask = pc.equal(groups, g)
        out[g] = _counts(status.filter(mask), reason.filter(mask))
    return out


def latest_log(workdir: Path, dirname: str) -> str | None:
    """The newest ``runs/<stamp>-<stage>*.log`` of a stage, relative to the run folder."""
    runs = workdir / "runs"
    if not runs.is_dir():
        return None
    logs = sorted(runs.glob(f"*-{dirname}*.log"), key=lambda p: (p.name[:16], p.stat().st_mtime))
    return str(logs[-1].relative_to(workdir)) if logs else None


def stage_status(cls: type[Stage], ctx: RunContext) -> dict[str, Any]:
    import pyarrow.compute as pc

    group = group_column()
    stage = cls(ctx)
    entry: dict[str, Any] = {"stage": cls.dirname(), **dict.fromkeys(STATUSES, 0), "reasons": {}}
    stats_file = stage.folder / "stats.json"
    ledger = stage_ledger(stage)
    if isinstance(stage, ItemStage):
        try:
            # Stale upstream rows count here: their clips are this stage's work once redone.
            eligible = eligible_table(stage, ctx, [group] if group else [], current_only=False)
        except AbortRun:  # upstream has not run: nothing is eligible yet
            entry["waiting_for_upstream"] = True
            return entry
        state = ledger.latest_table(["status", "reason", "fingerprint", "layer_fingerprint"])
        status, reason = _current(eligible, state)
        stale, layer = _stale(eligible, state, expected(stage, eligible, has_legacy(state["fingerprint"])))
        entry.update(_counts(status, reason))
        entry["stale"] = int(pc.sum(stale).as_py() or 0)
        if stage.has_layer():
            entry["layer"] = stage.layer_name
            entry["layer_stale"] = int(pc.sum(layer).as_py() or 0)
        held = held_back(eligible)
        if held:
            entry["waiting_on_stale"] = held
        entry["redo_failed"] = int(pc.sum(pc.equal(reason, KEPT_PREVIOUS).fill_null(False)).as_py() or 0)
        if group and group in eligible.column_names:
            groups = eligible[group].combine_chunks()
            entry["by_split"] = _by_group(groups, status, reason)
            for g, counts in entry["by_split"].items():
                counts["stale"] = int(pc.sum(stale.filter(pc.equal(groups, g))).as_py() or 0)
    else:
        if ledger.exists():
            names = {f.name for f in cls.output_schema()}
            state = ledger.latest_table(["status", "reason", *([group] if group and group in names else [])])
            entry.update(_counts(state["status"].combine_chunks(), state["reason"].combine_chunks()))
            if group and group in state.column_names:
                per_split = pc.value_counts(state[group].combine_chunks()).to_pylist()
                entry["by_split"] = {
                    str(v["values"]): int(v["counts"])
                    for v in sorted(per_split, key=lambda v: str(v["values"]))
                }
        entry["done"] = stats_file.exists()
        stale_count = stage.stale_count() if isinstance(stage, WholeStage) else None
        if stale_count is not None:
            entry["stale"] = stale_count
    stats, damaged = read_json(stats_file)
    if damaged:
        entry["stats_damaged"] = damaged
    for key in ("last_run", "summary"):
        if key in stats:
            entry[key] = stats[key]
    quarantined = stage.folder / QUARANTINE
    if quarantined.is_dir():
        entry["quarantined_parts"] = len(list(quarantined.glob("*.parquet")))
    log = latest_log(ctx.workdir, cls.dirname())
    if log:
        entry["log"] = log
    return entry


def run_status(ctx: RunContext) -> dict[str, Any]:
    """Every stage's entry; damaged ledger parts are skipped, and named in their stage's entry."""
    with tolerating_damage() as damaged:
        stages = [stage_status(c, ctx) for c in stage_classes()]
    for entry in stages:
        mine = [d for d in damaged if d.path.parent.parent.name == entry["stage"]]
        if mine:
            entry["damaged_parts"] = [_damage_entry(d, ctx.workdir) for d in mine]
    return {"workdir": str(ctx.workdir), "stages": stages}


def _damage_entry(part: DamagedPart, workdir: Path) -> dict[str, Any]:
    return {
        "path": str(part.path),
        "problem": part.problem,
        "bytes": part.size,
        "rows": part.rows,
        "items": len(part.clip_ids) if part.clip_ids is not None else None,
        "text": part.describe(workdir),
    }


def format_table(status: dict[str, Any]) -> str:
    head = f"{'stage':<14}{'ok':>9}{'failed_perm':>13}{'failed_trans':>14}{'pending':>9}{'stale':>8}  notes"
    lines = [f"run folder: {status['workdir']}", head, "-" * len(head)]
    logs = []
    for st in status["stages"]:
        notes = []
        if st.get("waiting_for_upstream"):
            notes.append("waiting for upstream")
        if "done" in st:
            notes.append("done" if st["done"] else "not run")
        if st["reasons"]:
            notes.append(", ".join(f"{k}={v}" for k, v in st["reasons"].items()))
        if st.get("redo_failed"):
            notes.append(f"{st['redo_failed']} failed redos kept their previous result")
        if st.get("layer_stale"):
            notes.append(f"{st['layer_stale']} with {st['layer']} to make anew (a plain run does)")
        stale = "" if st.get("stale") is None else st["stale"]
        last = st.get("last_run") or {}
        if last.get("exit_code"):
            notes.append(f"last run stopped (exit {last['exit_code']})")
        damaged = st.get("damaged_parts") or []
        if damaged:
            notes.append(f"{len(damaged)} damaged ledger part(s) not counted")
        if st.get("quarantined_parts"):
            notes.append(f"{st['quarantined_parts']} part(s) in quarantine/")
        lines.append(
            f"{st['stage']:<14}{st['ok']:>9}{st['failed_permanent']:>13}"
            f"{st['failed_transient']:>14}{st['pending']:>9}{stale:>8}  {'; '.join(notes)}"
        )
        # A stage's own findings, worded by the stage (its extra_stats "notes").
        summary = st.get("summary") if isinstance(st.get("summary"), dict) else {}
        lines += [f"  ! {note}" for note in summary.get("notes", [])]
        if last.get("exit_code"):
            lines.append(f"  ! {last.get('message', '')}")
        if st.get("waiting_on_stale"):
            lines.append(f"  ! {waiting_line(st['waiting_on_stale'])}")
        lines += [f"  ! damaged ledger part {d['text']}" for d in damaged]
        if damaged:
            lines.append("  ! `avcaps repair` moves it to quarantine/; the next run redoes its items")
        if st.get("stats_damaged"):
            lines.append(f"  ! {st['stats_damaged']}: the stage's next run (or `avcaps repair`) rewrites it")
        by_split = st.get("by_split")
        if by_split and isinstance(next(iter(by_split.values())), dict):
            for split, c in by_split.items():
                why = ", ".join(f"{k}={v}" for k, v in c["reasons"].items())
                lines.append(
                    f"  {split:<12}{c['ok']:>9}{c['failed_permanent']:>13}"
                    f"{c['failed_transient']:>14}{c['pending']:>9}{c.get('stale', ''):>8}  {why}"
                )
        if st.get("log"):
            logs.append(f"  {st['stage']:<14}{st['log']}")
    if logs:
        lines += ["latest run logs:", *logs]
    return "\n".join(lines)
