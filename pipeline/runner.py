"""The runner: one ``avcaps run`` of a stage, from selecting its pending items to its stats.

Per item, per run: every eligible item in the shard ends with exactly one current ledger row.
Completion is recorded per item, so a killed run resumes with the items that have no terminal row;
failures that may pass (``failed_transient``) are retried with exponential backoff up to the
stage's ``max_attempts``; ``--retry-failed`` re-queues every failed item, ``--force`` everything.

What is pending comes from :mod:`pipeline.selection`; the batches run in an executor
(:mod:`pipeline.executors`, :mod:`pipeline.ray_executor`); ``stats.json`` is written with
:mod:`pipeline.status`. The runner depends on them, never the other way round. One process at a
time works on a stage and shard (:mod:`pipeline.locks`); each run logs to
``DIR/runs/<stamp>-<stage>.log``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.executors import LocalExecutor, summarize_exception
from pipeline.io import atomic_write_text, clean_temp_files
from pipeline.machine import halt_for, machine_cause
from pipeline.selection import (
    WorkList,
    expected,
    has_legacy,
    held_back,
    item_columns,
    select_pending,
    selected,
    stage_ledger,
    upstream_ok,
    waiting_line,
)
from pipeline.stage import ItemStage, RunContext, RunOptions, Stage, WholeStage
from pipeline.status import stage_status

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("avcaps")
# Compaction is considered every this many commits of a run (it only merges small parts).
COMPACT_EVERY_COMMITS = 64
# At the end of a run, small parts are merged when at least this many are left.
COMPACT_AT_END_PARTS = 16


@dataclass
class RunReport:
    stage: str
    selected: int = 0
    processed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    exit_code: int = 0  # non-zero when the run stopped early (AbortRun)
    started: float | None = None  # time.monotonic() when the items started

    def line(self) -> str:
        if self.message:
            return f"{self.stage}: {self.message}"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        rate = self.processed / self.seconds if self.seconds else 0.0
        return f"{self.stage}: {self.processed} item attempts in {self.seconds:.1f}s ({rate:.2f}/s): {parts}"


def make_executor(stage: ItemStage, options: RunOptions) -> Any:
    if options.executor == "local":
        return LocalExecutor(stage, options)
    if options.executor == "ray":
        # Imported here so that a local run never loads the Ray executor's module (not a cycle:
        # the Ray executor depends on executors and selection, never on the runner).
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(stage, options)
    raise AbortRun(f"unknown executor {options.executor!r}; valid: local, ray")


def ordered(stage: ItemStage, upstream: pa.Table) -> pa.Table:
    """``upstream`` in the order the stage asks for (:meth:`ItemStage.order`), or as it is."""
    import pyarrow as pa

    idx = stage.order(upstream) if upstream.num_rows else None
    if idx is None:
        return upstream
    idx = pa.array(idx, type=pa.int64())
    if len(idx) != upstream.num_rows or len(set(idx.to_pylist())) != upstream.num_rows:
        raise AbortRun(
            f"stage {stage.dirname()}: order() must give a permutation of its {upstream.num_rows} rows"
        )
    return upstream.take(idx)


def run_item_stage(stage: ItemStage, options: RunOptions, report: RunReport | None = None) -> RunReport:
    """Run the pending items of ``stage``; ``report`` (filled as the run goes) is returned."""
    from tqdm import tqdm

    cfg = stage.stage_config
    report = report or RunReport(stage.dirname())
    ledger = stage_ledger(stage)
    found = upstream_ok(type(stage), stage.ctx, list(item_columns(stage)))
    waiting = waiting_line(held_back(found))
    upstream = ordered(stage, selected(stage, found))
    del found
    state = ledger.latest_table(["status", "attempts", "fingerprint", "layer_fingerprint"])
    exp = expected(stage, upstream, has_legacy(state["fingerprint"]))
    can_refresh = stage.has_layer()
    ids = upstream["clip_id"].combine_chunks()
    pending = select_pending(ids, state, options, cfg.max_attempts, exp, can_refresh)
    report.selected = len(pending)
    if not len(pending):
        report.message = f"nothing to do ({upstream.num_rows} eligible items are all done or failed)"
        if waiting:
            report.message = f"nothing to do for the {upstream.num_rows} current clips; {waiting}"
        log.info("%s: %s", stage.dirname(), report.message)
        return report
    log.info(
        "%s: %d of %d eligible items to do%s",
        stage.dirname(),
        len(pending),
        upstream.num_rows,
        f" (shard {options.shard[0]}/{options.shard[1]})" if options.shard else "",
    )
    if waiting:
        log.info("%s: besides, %s", stage.dirname(), waiting)
    refresh = int(pending["refresh"].sum())
    stale = int((pending["redo"] & ~pending["refresh"]).sum()) if not options.force else 0
    if stale:
        log.info(
            "%s: %d of them are stale (made with other settings or from other values of what they read)",
            stage.dirname(),
            stale,
        )
    if refresh:
        log.info(
            "%s: %d of them keep their row and get their %s made anew (its settings or inputs changed)",
            stage.dirname(),
            refresh,
            stage.layer_name,
        )
    stage.work = frozenset(
        {*(["refresh"] if refresh else []), *(["process"] if refresh < len(pending) else [])}
    )
    # A redo that fails keeps the item's previous ok row current: the executors need those rows.
    current = ledger.latest_table() if bool(pending["redo"].any()) else None
    todo = WorkList.of(upstream, pending, current)
    del upstream, state, current
    stage.folder.mkdir(parents=True, exist_ok=True)
    t0 = report.started = time.monotonic()
    commits = 0
    with make_executor(stage, options) as executor:
        while len(todo):
            retry: list[dict[str, Any]] = []
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
                        retry.append(row)
                report.processed += len(summaries)
                bar.update(len(summaries))
                commits += 1
                if commits % COMPACT_EVERY_COMMITS == 0:
                    ledger.maybe_compact()
            bar.close()
            if retry:
                attempt = int(retry[0]["attempts"]) + 1
                delay = min(cfg.backoff_s * 2 ** (attempt - 2), cfg.backoff_max_s)
                log.info(
                    "%s: %d transient failures; retrying in %.1fs (attempt %d/%d)",
                    stage.dirname(),
                    len(retry),
                    delay,
                    attempt,
                    cfg.max_attempts,
                )
                time.sleep(delay)
                todo = todo.retry(retry)
            else:
                break
    report.seconds = time.monotonic() - t0
    if len(ledger.small_parts()) >= COMPACT_AT_END_PARTS:
        ledger.compact()
    return report


def dry_run_stage(cls: type[Stage], ctx: RunContext, options: RunOptions, n: int) -> Iterator[str]:
    """``avcaps run STAGE --dry-run N``: the stage's own :meth:`~ItemStage.dry_run` on the first
    ``n`` items a run would take (``--force``/``--retry-failed``/``--shard`` choose as they do for
    a run). Writes nothing: no ledger row, no stats, no run log, no lock taken."""
    stage = cls(ctx)
    if not isinstance(stage, ItemStage) or type(stage).dry_run is ItemStage.dry_run:
        raise AbortRun(f"stage {cls.dirname()} offers no dry run")
    found = upstream_ok(cls, ctx, list(item_columns(stage)))
    waiting = waiting_line(held_back(found))
    upstream = ordered(stage, selected(stage, found))
    state = stage_ledger(stage).latest_table(["status", "attempts", "fingerprint", "layer_fingerprint"])
    limited = RunOptions(**{**options.__dict__, "limit": n})
    max_attempts = stage.stage_config.max_attempts
    exp = expected(stage, upstream, has_legacy(state["fingerprint"]))
    pending = select_pending(upstream["clip_id"].combine_chunks(), state, limited, max_attempts, exp)
    if not len(pending):
        done = f"{upstream.num_rows} eligible items are all done or failed"
        yield f"{cls.dirname()}: nothing to try ({done})" + (f"; {waiting}" if waiting else "") + "\n"
        return
    if waiting:
        yield f"{cls.dirname()}: besides, {waiting}\n"
    stage.setup()
    try:
        for batch in WorkList.of(upstream, pending).batches(n):
            yield from stage.dry_run(batch)
    finally:
        stage.teardown()


def write_stats(stage: Stage, report: RunReport, extra: dict[str, Any] | None = None) -> None:
    stats = stage_status(type(stage), stage.ctx)
    stats["last_run"] = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "selected": report.selected,
        "processed": report.processed,
        "counts": report.counts,
        "seconds": round(report.seconds, 3),
        "items_per_s": round(report.processed / report.seconds, 3) if report.seconds else None,
        "message": report.message,
        "exit_code": report.exit_code,
    }
    if extra:
        stats["summary"] = extra
    stage.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage.folder / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")


# -- one `avcaps run` -------------------------------------------------------------------------------
def _claim(folder: Path, stem: str, suffix: str) -> Path:
    """A new file ``stem.suffix`` in ``folder`` (``stem-<pid>`` if another run took the name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (stem, f"{stem}-{os.getpid()}"):
        path = folder / f"{name}{suffix}"
        try:
            with open(path, "x"):
                return path
        except FileExistsError:
            continue
    return folder / f"{stem}-{os.getpid()}-{time.monotonic_ns()}{suffix}"


class _LogFile(logging.FileHandler):
    """The run log's handler: a write it cannot make because the disk is full says nothing on
    stderr (the run's one-line halt names the disk); any other logging error is reported."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and machine_cause(exc) is not None:
            return
        super().handleError(record)


class _RunLog:
    """INFO and up of the ``avcaps`` logger, also to ``DIR/runs/<stamp>-<stage>.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler = _LogFile(path, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> _RunLog:
        logger = logging.getLogger("avcaps")
        logger.addHandler(self.handler)
        if logger.getEffectiveLevel() > logging.INFO:
            self._level: int | None = logger.level
            logger.setLevel(logging.INFO)
        else:
            self._level = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        logger = logging.getLogger("avcaps")
        if exc is not None:
            if isinstance(exc, AbortRun):
                text = f"aborted: {exc}"
            elif isinstance(exc, KeyboardInterrupt):
                text = "interrupted"
            else:
                text = f"crashed: {summarize_exception(exc)}"
            # To the run log only: the terminal gets the error once, from the CLI (`error: ...`),
            # or Python's traceback.
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, text, (), None)
            self.handler.handle(record)
        logger.removeHandler(self.handler)
        self.handler.close()
        if self._level is not None:
            logger.setLevel(self._level)


@contextlib.contextmanager
def machine_halts(stage: Stage) -> Iterator[None]:
    """An error of the machine (a full disk, no memory: :mod:`pipeline.machine`) raised anywhere in
    a run, a ledger commit or a whole stage's work included, becomes the one-line RunHalted."""
    try:
        yield
    except AbortRun:
        raise
    except Exception as exc:
        if (found := machine_cause(exc)) is None:
            raise
        code, cause = found
        raise halt_for(code, cause, stage.write_dirs(), stage.dirname()) from exc


def run_stage(cls: type[Stage], ctx: RunContext, options: RunOptions) -> RunReport:
    """Run one stage of a run folder; the entry point of ``avcaps run``."""
    stage = cls(ctx)
    with machine_halts(stage):
        return _run_stage(stage, options)


def _run_stage(stage: Stage, options: RunOptions) -> RunReport:
    from pipeline.config import dump_config
    from pipeline.locks import stage_lock

    cls, ctx = type(stage), stage.ctx
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # Save the resolved config with each run, so every run folder says how it was made.
    config_text = dump_config(ctx.config)
    atomic_write_text(ctx.workdir / "config.yaml", config_text)
    runs = ctx.workdir / "runs"
    log_path = _claim(runs, f"{stamp}-{cls.dirname()}", ".log")
    atomic_write_text(log_path.with_suffix(".yaml"), config_text)
    shard = options.shard if isinstance(stage, ItemStage) else None
    with _RunLog(log_path), machine_halts(stage):
        log.info(
            "%s: run in %s (pid %d%s)",
            cls.dirname(),
            ctx.workdir,
            os.getpid(),
            f", shard {shard[0]}/{shard[1]}" if shard else "",
        )
        with stage_lock(stage.folder, cls.dirname(), shard):
            stage_ledger(stage).recover()
            clean_temp_files(stage.folder, recursive=False)
            clean_temp_files(ctx.tmp_dir, recursive=False)
            if isinstance(stage, WholeStage):
                t0 = time.monotonic()
                summary = stage.run(options)
                report = RunReport(cls.dirname(), message=str(summary.get("message", "done")))
                report.seconds = time.monotonic() - t0
                write_stats(stage, report, summary)
            else:
                assert isinstance(stage, ItemStage)
                report = RunReport(cls.dirname())
                try:
                    with machine_halts(stage):
                        run_item_stage(stage, options, report)
                except AbortRun as exc:
                    # A stage that stopped after working says why in its stats (`avcaps status`).
                    # Never for a stage without a ledger: its stats would read as "ran, nothing
                    # eligible" to the next stage.
                    if stage_ledger(stage).exists():
                        report.message = f"stopped: {exc}"
                        report.exit_code = exc.exit_code
                        if report.started is not None:
                            report.seconds = time.monotonic() - report.started
                        _stats_after_stop(stage, report)
                    raise
                write_stats(stage, report, stage.extra_stats(stage_ledger(stage).latest()))
        log.info("%s", report.line())
    return report


def _stats_after_stop(stage: Stage, report: RunReport) -> None:
    """The stats of a stopped run, unless the disk that stopped it cannot take them either (the
    next run writes them; the stop's own line says what happened)."""
    try:
        write_stats(stage, report, stage.extra_stats(stage_ledger(stage).latest()))
    except OSError as exc:
        if machine_cause(exc) is None:
            raise
        log.warning("%s: stats.json not written: %s", stage.dirname(), exc)
