"""The runner: selects pending items, calls the stage batch by batch, commits results.

Per item, per run: every eligible item in the shard ends with exactly one current ledger row.
Completion is recorded per item, so a killed run resumes with the items that have no terminal row;
failures that may pass (``failed_transient``) are retried with exponential backoff up to the
stage's ``max_attempts``; ``--retry-failed`` re-queues every failed item, ``--force`` everything.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError
from pipeline.io import atomic_write_text, clean_temp_files
from pipeline.ledger import BASE_COLUMNS, Ledger
from pipeline.registry import ancestors
from pipeline.sharding import in_shard
from pipeline.stage import Item, ItemStage, Result, RunContext, RunOptions, Stage, WholeStage

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("avcaps")


def stage_ledger(stage: Stage) -> Ledger:
    return Ledger(stage.folder / "ledger", stage.output_schema())  # type: ignore[attr-defined]


def to_python(value: Any) -> Any:
    """Pandas cells back to plain Python (lists arrive as numpy arrays, nulls as NaN/None)."""
    import numpy as np
    import pandas as pd

    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()]
    if isinstance(value, list):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or (not isinstance(value, (str, bytes, dict)) and pd.isna(value)):
        return None
    return value


def upstream_table(cls: type[Stage], ctx: RunContext) -> pd.DataFrame:
    """The clip rows joined with the ok outputs of every ancestor of ``cls``, by ``clip_id``."""

    table: pd.DataFrame | None = None
    for anc_cls in ancestors(cls):
        anc = anc_cls(ctx)
        ledger = stage_ledger(anc)
        if not ledger.exists():
            raise AbortRun(
                f"stage {anc.dirname()} has not run yet in {ctx.workdir}: run `avcaps run {anc.number}` first"
            )
        df = ledger.latest()
        df = df[df["status"] == "ok"]
        cols = [c for c in df.columns if c not in BASE_COLUMNS]
        df = df[cols]
        if table is None:
            table = df
        else:
            clash = set(cols) & set(table.columns)
            if clash:
                raise AbortRun(f"stage {anc.dirname()} outputs clash with upstream columns: {clash}")
            table = table.join(df, how="inner")
    if table is None:
        raise AbortRun(f"stage {cls.dirname()} has no upstream stage to take items from")
    return table


def eligible_items(stage: ItemStage, ctx: RunContext) -> pd.DataFrame:
    table = upstream_table(type(stage), ctx)
    if table.empty:
        return table
    mask = [stage.wants({k: to_python(v) for k, v in row.items()}) for row in table.to_dict("records")]
    return table[mask]


def _summarize_exception(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{f.name}@{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1])
    return f"{type(exc).__name__}: {exc} [{where}]"[:2000]


def _fail(item: Item, exc: BaseException) -> Result:
    if isinstance(exc, ItemError):
        return Result.failed(item.clip_id, exc)
    return Result(
        item.clip_id,
        "failed_permanent",
        {},
        f"unexpected:{type(exc).__name__}",
        _summarize_exception(exc),
    )


def run_batch(stage: ItemStage, batch: list[Item]) -> list[Result]:
    """Call ``process``; if the whole batch raises, isolate the culprit item by item."""
    try:
        results = stage.process(batch)
    except AbortRun:
        raise
    except Exception as exc:  # one bad item must not fail its neighbours
        if len(batch) == 1:
            return [_fail(batch[0], exc)]
        log.warning(
            "%s: batch of %d raised %s; retrying item by item",
            stage.dirname(),
            len(batch),
            type(exc).__name__,
        )
        return [r for item in batch for r in run_batch(stage, [item])]
    by_id = {r.clip_id: r for r in results}
    out = []
    for item in batch:
        res = by_id.get(item.clip_id)
        if res is None:
            res = Result(
                item.clip_id,
                "failed_permanent",
                {},
                "no_result",
                "the stage returned no result for this item",
            )
        out.append(res)
    return out


@dataclass
class RunReport:
    stage: str
    selected: int = 0
    processed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""

    def line(self) -> str:
        if self.message:
            return f"{self.stage}: {self.message}"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        rate = self.processed / self.seconds if self.seconds else 0.0
        return f"{self.stage}: {self.processed} item attempts in {self.seconds:.1f}s ({rate:.2f}/s): {parts}"


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def select_pending(
    eligible: pd.DataFrame, state: pd.DataFrame, options: RunOptions, max_attempts: int
) -> list[Item]:
    items: list[Item] = []
    for clip_id, row in zip(eligible.index, eligible.to_dict("records"), strict=True):
        if not in_shard(clip_id, options.shard):
            continue
        attempt = 1
        if clip_id in state.index and not options.force:
            prev = state.loc[clip_id]
            status, tries = prev["status"], int(prev["attempts"] or 0)
            if status == "ok":
                continue
            if not options.retry_failed:
                if status == "failed_permanent" or tries >= max_attempts:
                    continue
                attempt = tries + 1
        items.append(Item(clip_id, {k: to_python(v) for k, v in row.items()}, attempt))
        if options.limit is not None and len(items) >= options.limit:
            break
    return items


def result_rows(batch: list[Item], results: list[Result]) -> list[dict[str, Any]]:
    """Ledger rows for the results of a batch (attempt numbers come from the items)."""
    attempts = {item.clip_id: item.attempt for item in batch}
    return [
        {
            "clip_id": res.clip_id,
            "status": res.status,
            "reason": res.reason,
            "message": res.message,
            "attempts": attempts[res.clip_id],
            **res.outputs,
        }
        for res in results
    ]


def process_and_commit(
    stage: ItemStage, ledger: Ledger, batch: list[Item], part_name: str | None = None
) -> list[dict[str, Any]]:
    """Process one batch and commit its rows (the rename is the commit: a crash loses this batch
    at most). Returns one small summary per item for the driver."""
    rows = result_rows(batch, run_batch(stage, batch))
    ledger.commit(rows, name=part_name)
    return [{"clip_id": r["clip_id"], "status": r["status"], "attempts": r["attempts"]} for r in rows]


class LocalExecutor:
    """Runs the batches in this process, one after another."""

    def __init__(self, stage: ItemStage, options: RunOptions) -> None:
        self.stage = stage
        self.ledger = stage_ledger(stage)

    def __enter__(self) -> LocalExecutor:
        self.stage.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.teardown()

    def run_pass(self, todo: list[Item]) -> Iterator[list[dict[str, Any]]]:
        for batch in _batches(todo, self.stage.stage_config.batch_size):
            yield process_and_commit(self.stage, self.ledger, batch)


def make_executor(stage: ItemStage, options: RunOptions) -> Any:
    if options.executor == "local":
        return LocalExecutor(stage, options)
    if options.executor == "ray":
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(stage, options)
    raise AbortRun(f"unknown executor {options.executor!r}; valid: local, ray")


def run_item_stage(stage: ItemStage, options: RunOptions) -> RunReport:
    from tqdm import tqdm

    cfg = stage.stage_config
    report = RunReport(stage.dirname())
    ledger = stage_ledger(stage)
    eligible = eligible_items(stage, stage.ctx)
    pending = select_pending(eligible, ledger.latest(), options, cfg.max_attempts)
    report.selected = len(pending)
    if not pending:
        report.message = f"nothing to do ({len(eligible)} eligible items are all done or failed)"
        return report
    stage.folder.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with make_executor(stage, options) as executor:
        todo = pending
        while todo:
            by_id = {item.clip_id: item for item in todo}
            retry: list[Item] = []
            bar = tqdm(
                total=len(todo),
                desc=stage.dirname(),
                unit="item",
                disable=not options.progress,
                dynamic_ncols=True,
            )
            for summaries in executor.run_pass(todo):
                for row in summaries:
                    report.counts[row["status"]] = report.counts.get(row["status"], 0) + 1
                    if row["status"] == "failed_transient" and row["attempts"] < cfg.max_attempts:
                        item = by_id[row["clip_id"]]
                        retry.append(Item(item.clip_id, item.data, item.attempt + 1))
                report.processed += len(summaries)
                bar.update(len(summaries))
            bar.close()
            if retry:
                delay = min(cfg.backoff_s * 2 ** (retry[0].attempt - 2), cfg.backoff_max_s)
                log.info(
                    "%s: %d transient failures; retrying in %.1fs (attempt %d/%d)",
                    stage.dirname(),
                    len(retry),
                    delay,
                    retry[0].attempt,
                    cfg.max_attempts,
                )
                time.sleep(delay)
            todo = retry
    report.seconds = time.monotonic() - t0
    if len(ledger.parts()) > 64:
        ledger.compact()
    return report


def write_stats(stage: Stage, report: RunReport, extra: dict[str, Any] | None = None) -> None:
    from pipeline.status import stage_status

    stats = stage_status(type(stage), stage.ctx)
    stats["last_run"] = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "selected": report.selected,
        "processed": report.processed,
        "counts": report.counts,
        "seconds": round(report.seconds, 3),
        "items_per_s": round(report.processed / report.seconds, 3) if report.seconds else None,
        "message": report.message,
    }
    if extra:
        stats["summary"] = extra
    stage.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage.folder / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")


def run_stage(cls: type[Stage], ctx: RunContext, options: RunOptions) -> RunReport:
    """Run one stage of a run folder; the entry point of ``avcaps run``."""
    from pipeline.config import dump_config

    ctx.workdir.mkdir(parents=True, exist_ok=True)
    stage = cls(ctx)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # Save the resolved config with each run, so every run folder says how it was made.
    atomic_write_text(ctx.workdir / "config.yaml", dump_config(ctx.config))
    atomic_write_text(ctx.workdir / "runs" / f"{stamp}-{cls.dirname()}.yaml", dump_config(ctx.config))
    for folder in (stage.folder, ctx.media_dir):
        clean_temp_files(folder)
    if isinstance(stage, WholeStage):
        t0 = time.monotonic()
        summary = stage.run(options)
        report = RunReport(cls.dirname(), message=str(summary.get("message", "done")))
        report.seconds = time.monotonic() - t0
        write_stats(stage, report, summary)
        return report
    assert isinstance(stage, ItemStage)
    report = run_item_stage(stage, options)
    write_stats(stage, report, stage.extra_stats(stage_ledger(stage).latest()))
    return report
