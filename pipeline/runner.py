"""The runner: selects pending items, calls the stage batch by batch, commits results.

Per item, per run: every eligible item in the shard ends with exactly one current ledger row.
Completion is recorded per item, so a killed run resumes with the items that have no terminal row;
failures that may pass (``failed_transient``) are retried with exponential backoff up to the
stage's ``max_attempts``; ``--retry-failed`` re-queues every failed item, ``--force`` everything.

Selection is vectorized over Arrow/pandas columns and the items' data is materialized one batch at
a time, so a run of millions of clips reaches its first batch in seconds. One process at a time
works on a stage and shard (:mod:`pipeline.locks`); each run logs to ``DIR/runs/<stamp>-<stage>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError
from pipeline.io import atomic_write_text, clean_temp_files
from pipeline.ledger import Ledger, to_pandas
from pipeline.registry import ancestors
from pipeline.sharding import in_shard
from pipeline.stage import Item, ItemStage, Result, RunContext, RunOptions, Stage, WholeStage

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger("avcaps")
# Compaction is considered every this many commits of a run (it only merges small parts).
COMPACT_EVERY_COMMITS = 64
# At the end of a run, small parts are merged when at least this many are left.
COMPACT_AT_END_PARTS = 16


def stage_ledger(stage: Stage | type[Stage], workdir: Path | None = None) -> Ledger:
    """The ledger of a stage (an instance, or a class and the run folder), with its schema."""
    folder = (workdir / stage.dirname()) if workdir is not None else stage.folder  # type: ignore[union-attr]
    return Ledger(Path(folder) / "ledger", stage.output_schema())


def to_python(value: Any) -> Any:
    """Pandas cells back to plain Python (lists arrive as numpy arrays, nulls as NaN/None/NA)."""
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


# -- what is upstream -----------------------------------------------------------------------------
def upstream_ok(cls: type[Stage], ctx: RunContext, columns: list[str] | None = None) -> pa.Table:
    """``clip_id`` plus ``columns`` (None: every output column) of the clips that are ok in every
    ancestor of ``cls``, joined by ``clip_id``, in clip-table order."""
    import pyarrow.compute as pc

    table: pa.Table | None = None
    for anc_cls in ancestors(cls):
        ledger = stage_ledger(anc_cls, ctx.workdir)
        # A stage that ran with nothing to do (no eligible clip) commits no row but writes its
        # stats: it has run, and passes on no clip.
        if not ledger.exists() and not (ctx.workdir / anc_cls.dirname() / "stats.json").exists():
            raise AbortRun(
                f"stage {anc_cls.dirname()} has not run yet in {ctx.workdir}: "
                f"run `avcaps run {anc_cls.number}` first"
            )
        outs = [f.name for f in anc_cls.output_schema()]
        want = outs if columns is None else [c for c in columns if c in outs]
        state = ledger.latest_table(["status", *want])
        state = state.filter(pc.equal(state["status"], "ok"))
        if table is None:
            table = state.select(["clip_id", *want])
            continue
        clash = set(want) & set(table.column_names)
        if clash:
            raise AbortRun(f"stage {anc_cls.dirname()} outputs clash with upstream columns: {sorted(clash)}")
        idx = pc.index_in(table["clip_id"], value_set=state["clip_id"].combine_chunks())
        keep = pc.is_valid(idx)
        table, idx = table.filter(keep), idx.filter(keep)
        for name in want:
            table = table.append_column(state.schema.field(name), state[name].take(idx))
    if table is None:
        raise AbortRun(f"stage {cls.dirname()} has no upstream stage to take items from")
    return table


def _selected(stage: ItemStage, table: pa.Table) -> pa.Table:
    """The rows of ``table`` (upstream clips) that ``stage.select`` keeps."""
    import numpy as np

    if not stage.selection_columns or table.num_rows == 0:
        return table
    frame = to_pandas(table.select(["clip_id", *stage.selection_columns])).set_index("clip_id", drop=False)
    mask = stage.select(frame)
    if mask is None:
        return table
    return table.filter(np.asarray(mask, dtype=bool))


def eligible_frame(
    stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """The clips ``stage`` applies to (ok upstream, kept by ``select``), indexed by ``clip_id``,
    with the upstream ``columns`` asked for (e.g. ``split``)."""
    cols = list(dict.fromkeys([*stage.selection_columns, *columns]))
    table = _selected(stage, upstream_ok(type(stage), ctx, cols))
    return to_pandas(table.select(["clip_id", *[c for c in columns if c in table.column_names]])).set_index(
        "clip_id", drop=False
    )


# -- what is pending ------------------------------------------------------------------------------
def select_pending(
    eligible_ids: pa.Array | list[str], state: pa.Table, options: RunOptions, max_attempts: int
) -> pd.DataFrame:
    """The items to work on, in ``eligible_ids`` order: ``clip_id``, ``attempt``, ``seq`` (the seq
    of the row each one supersedes). ``state`` is the stage's current rows (clip_id, status,
    attempts, seq)."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(eligible_ids, type=pa.string()) if isinstance(eligible_ids, list) else eligible_ids
    if options.shard is not None:
        keep = [in_shard(c, options.shard) for c in ids.to_pylist()]
        ids = ids.filter(pa.array(keep, type=pa.bool_()))
    idx = pc.index_in(ids, value_set=state["clip_id"].combine_chunks())
    has_row = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    status = state["status"].take(idx).fill_null("").to_numpy(zero_copy_only=False)
    tries = state["attempts"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    seq = state["seq"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if options.force:
        pending = np.ones(len(ids), dtype=bool)
        attempt = np.ones(len(ids), dtype=np.int64)
    elif options.retry_failed:
        pending = ~has_row | (status != "ok")
        attempt = np.ones(len(ids), dtype=np.int64)
    else:
        retryable = (status != "ok") & (status != "failed_permanent") & (tries < max_attempts)
        pending = ~has_row | retryable
        attempt = np.where(has_row, tries + 1, 1)
    out = pd.DataFrame(
        {
            "clip_id": ids.filter(pa.array(pending)).to_pylist(),
            "attempt": attempt[pending],
            "seq": seq[pending],
        }
    )
    if options.limit is not None:
        out = out.head(options.limit)
    return out


class WorkList:
    """The items of one pass, their data kept as an Arrow table and turned into :class:`Item`
    objects one batch at a time (millions of items never sit in memory as Python objects)."""

    def __init__(self, data: pa.Table, attempts: list[int], seqs: list[int]) -> None:
        self.data = data  # clip_id + upstream columns, one row per item
        self.attempts = attempts
        self.seqs = seqs

    @classmethod
    def of(cls, upstream: pa.Table, pending: pd.DataFrame) -> WorkList:
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = pa.array(pending["clip_id"].tolist(), type=pa.string())
        idx = pc.index_in(ids, value_set=upstream["clip_id"].combine_chunks())
        return cls(upstream.take(idx), pending["attempt"].tolist(), pending["seq"].tolist())

    def __len__(self) -> int:
        return self.data.num_rows

    def batches(self, size: int) -> Iterator[list[Item]]:
        for start in range(0, len(self), size):
            rows = self.data.slice(start, size).to_pylist()
            yield [
                Item(
                    row.pop("clip_id"),
                    row,
                    int(self.attempts[start + k]),
                    int(self.seqs[start + k]),
                )
                for k, row in enumerate(rows)
            ]

    def items(self) -> Iterator[Item]:
        for batch in self.batches(4096):
            yield from batch

    def retry(self, rows: list[dict[str, Any]]) -> WorkList:
        """The next attempt of the items in ``rows`` (summaries: clip_id, attempts, seq)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = pa.array([r["clip_id"] for r in rows], type=pa.string())
        idx = pc.index_in(ids, value_set=self.data["clip_id"].combine_chunks())
        return WorkList(
            self.data.take(idx), [int(r["attempts"]) + 1 for r in rows], [int(r["seq"]) for r in rows]
        )


# -- running a batch ------------------------------------------------------------------------------
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
    exit_code: int = 0  # non-zero when the run stopped early (AbortRun)
    started: float | None = None  # time.monotonic() when the items started

    def line(self) -> str:
        if self.message:
            return f"{self.stage}: {self.message}"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        rate = self.processed / self.seconds if self.seconds else 0.0
        return f"{self.stage}: {self.processed} item attempts in {self.seconds:.1f}s ({rate:.2f}/s): {parts}"


def result_rows(batch: list[Item], results: list[Result]) -> list[dict[str, Any]]:
    """Ledger rows for the results of a batch (attempt numbers and order come from the items)."""
    by_id = {item.clip_id: item for item in batch}
    return [
        {
            "clip_id": res.clip_id,
            "status": res.status,
            "reason": res.reason,
            "message": res.message,
            "attempts": by_id[res.clip_id].attempt,
            "seq": by_id[res.clip_id].seq + 1,
            **res.outputs,
        }
        for res in results
    ]


def partial_rows(batch: list[Item], exc: AbortRun) -> list[dict[str, Any]]:
    """Ledger rows for the results an aborting ``process`` finished first (items of ``batch``
    only); the items without one keep their current row, so an item never tried loses no attempt."""
    ids = {item.clip_id for item in batch}
    return result_rows(batch, [r for r in exc.results if isinstance(r, Result) and r.clip_id in ids])


def process_and_commit(
    stage: ItemStage, ledger: Ledger, batch: list[Item], part_name: str | None = None
) -> list[dict[str, Any]]:
    """Process one batch and commit its rows (the rename is the commit: a crash loses this batch
    at most). Returns one small summary per item for the driver."""
    try:
        rows = result_rows(batch, run_batch(stage, batch))
    except AbortRun as exc:
        if rows := partial_rows(batch, exc):
            ledger.commit(rows, name=part_name)
        raise
    ledger.commit(rows, name=part_name)
    return _summaries(rows)


def _summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("clip_id", "status", "attempts", "seq")} for r in rows]


class LocalExecutor:
    """Runs the batches in this process, one after another.

    Group commit: rows of batches that finish within ``commit_interval_s`` of the last commit wait
    in memory and go to the ledger together, so a fast stage writes a part (and pays its fsyncs)
    about once a second instead of once per batch. Whatever is buffered is committed at the end of
    every pass and when the run stops for any reason but a hard kill (an abort, Ctrl-C, SIGTERM).
    """

    MAX_BUFFERED_ROWS = 50_000

    def __init__(self, stage: ItemStage, options: RunOptions) -> None:
        self.stage = stage
        self.ledger = stage_ledger(stage)
        self.buffer: list[dict[str, Any]] = []
        self.last_commit = time.monotonic()

    def __enter__(self) -> LocalExecutor:
        self.stage.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()
        finally:
            self.stage.teardown()

    def flush(self) -> None:
        if self.buffer:
            self.ledger.commit(self.buffer)
            self.buffer = []
        self.last_commit = time.monotonic()

    def run_pass(self, todo: WorkList) -> Iterator[list[dict[str, Any]]]:
        cfg = self.stage.stage_config
        for batch in todo.batches(cfg.batch_size):
            try:
                rows = result_rows(batch, run_batch(self.stage, batch))
            except AbortRun as exc:
                self.buffer.extend(partial_rows(batch, exc))  # committed by __exit__'s flush
                raise
            self.buffer.extend(rows)
            due = time.monotonic() - self.last_commit >= cfg.commit_interval_s
            if due or len(self.buffer) >= self.MAX_BUFFERED_ROWS:
                self.flush()
            yield _summaries(rows)
        self.flush()


def make_executor(stage: ItemStage, options: RunOptions) -> Any:
    if options.executor == "local":
        return LocalExecutor(stage, options)
    if options.executor == "ray":
        from pipeline.ray_executor import RayExecutor

        return RayExecutor(stage, options)
    raise AbortRun(f"unknown executor {options.executor!r}; valid: local, ray")


def run_item_stage(stage: ItemStage, options: RunOptions, report: RunReport | None = None) -> RunReport:
    """Run the pending items of ``stage``; ``report`` (filled as the run goes) is returned."""
    from tqdm import tqdm

    cfg = stage.stage_config
    report = report or RunReport(stage.dirname())
    ledger = stage_ledger(stage)
    upstream = _selected(stage, upstream_ok(type(stage), stage.ctx))
    state = ledger.latest_table(["status", "attempts"])
    pending = select_pending(upstream["clip_id"].combine_chunks(), state, options, cfg.max_attempts)
    report.selected = len(pending)
    if not len(pending):
        report.message = f"nothing to do ({upstream.num_rows} eligible items are all done or failed)"
        log.info("%s: %s", stage.dirname(), report.message)
        return report
    log.info(
        "%s: %d of %d eligible items to do%s",
        stage.dirname(),
        len(pending),
        upstream.num_rows,
        f" (shard {options.shard[0]}/{options.shard[1]})" if options.shard else "",
    )
    todo = WorkList.of(upstream, pending)
    del upstream, state
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


class _RunLog:
    """INFO and up of the ``avcaps`` logger, also to ``DIR/runs/<stamp>-<stage>.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler = logging.FileHandler(path, encoding="utf-8")
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
                logger.error("aborted: %s", exc)
            elif isinstance(exc, KeyboardInterrupt):
                logger.error("interrupted")
            else:
                logger.error("crashed: %s", _summarize_exception(exc))
        logger.removeHandler(self.handler)
        self.handler.close()
        if self._level is not None:
            logger.setLevel(self._level)


def run_stage(cls: type[Stage], ctx: RunContext, options: RunOptions) -> RunReport:
    """Run one stage of a run folder; the entry point of ``avcaps run``."""
    from pipeline.config import dump_config
    from pipeline.locks import stage_lock

    ctx.workdir.mkdir(parents=True, exist_ok=True)
    stage = cls(ctx)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # Save the resolved config with each run, so every run folder says how it was made.
    config_text = dump_config(ctx.config)
    atomic_write_text(ctx.workdir / "config.yaml", config_text)
    runs = ctx.workdir / "runs"
    log_path = _claim(runs, f"{stamp}-{cls.dirname()}", ".log")
    atomic_write_text(log_path.with_suffix(".yaml"), config_text)
    shard = options.shard if isinstance(stage, ItemStage) else None
    with _RunLog(log_path):
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
                        write_stats(stage, report, stage.extra_stats(stage_ledger(stage).latest()))
                    raise
                write_stats(stage, report, stage.extra_stats(stage_ledger(stage).latest()))
        log.info("%s", report.line())
    return report
