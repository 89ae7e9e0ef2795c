"""Executors: how the runner's passes over pending items are run, and a batch becomes ledger rows.

:func:`run_batch` calls a stage's ``process`` and isolates the item that raises;
:func:`result_rows` turns results into ledger rows (attempt and ``seq`` come from the items);
:func:`process_and_commit` is one batch end to end, as a Ray worker runs it. A stage that stops
the run from ``process`` (``AbortRun``) may carry the results it finished first; both executors
commit those (:func:`partial_rows`) before the abort goes on. :class:`LocalExecutor`
runs the batches in this process with group commits; ``pipeline.ray_executor`` runs them on a Ray
cluster. The runner picks one; executors know nothing of the runner.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun, ItemError, RunHalted
from pipeline.ledger import Ledger
from pipeline.machine import check_room, halt_for, machine_cause, text_cause
from pipeline.selection import stage_ledger
from pipeline.stage import Item, ItemStage, Result, RunOptions

if TYPE_CHECKING:
    from pipeline.selection import WorkList

log = logging.getLogger("avcaps")
#: Reason of the copy of a previous ok row that a failed redo leaves current.
KEPT_PREVIOUS = "kept_previous"


def summarize_exception(exc: BaseException) -> str:
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
        summarize_exception(exc),
    )


def _room(stage: ItemStage) -> RunHalted | None:
    """A :class:`RunHalted` when a filesystem the stage writes to is read-only or under its
    ``min_free_mb`` (:func:`pipeline.machine.check_room`)."""
    cfg = stage.stage_config
    return check_room(stage.write_dirs(), cfg.min_free_mb, f"{stage.name}.min_free_mb")


def _in_flight(stage: ItemStage, batch: list[Item]) -> str:
    ids = ", ".join(item.clip_id for item in batch[:3])
    more = f" and {len(batch) - 3} more" if len(batch) > 3 else ""
    return f"{stage.dirname()} on {ids}{more}"


def run_batch(stage: ItemStage, batch: list[Item]) -> list[Result]:
    """Call ``process``; if the whole batch raises, isolate the culprit item by item.

    A condition of the machine (:mod:`pipeline.machine`) is no item's failure: a full or read-only
    filesystem before the batch, an error of the machine raised by it, or a failed item once a
    filesystem it writes to is short of room, stops the run with :class:`RunHalted`, which
    carries the batch's ok results (committed); its failed items get no row.
    """
    if halt := _room(stage):
        raise halt
    results = _isolate(stage, batch)
    failed = [r for r in results if r.status != "ok"]
    if failed:
        code = next((c for r in failed if (c := text_cause(r.message)) is not None), None)
        halt = halt_for(code, None, stage.write_dirs(), _in_flight(stage, batch)) if code else _room(stage)
        if halt:
            halt.results = [r for r in results if r.status == "ok"]
            raise halt
    return results


def _call(stage: ItemStage, batch: list[Item]) -> list[Result]:
    """The stage's ``process`` for items to make, its ``refresh`` for layers to make anew."""
    fresh = [item for item in batch if item.refresh]
    todo = [item for item in batch if not item.refresh]
    return [*(stage.refresh(fresh) if fresh else []), *(stage.process(todo) if todo else [])]


def _isolate(stage: ItemStage, batch: list[Item]) -> list[Result]:
    try:
        results = _call(stage, batch)
    except AbortRun:
        raise
    except Exception as exc:  # one bad item must not fail its neighbours
        if found := machine_cause(exc):
            code, cause = found
            raise halt_for(code, cause, stage.write_dirs(), _in_flight(stage, batch)) from exc
        if len(batch) == 1:
            return [_fail(batch[0], exc)]
        log.warning(
            "%s: batch of %d raised %s; retrying item by item",
            stage.dirname(),
            len(batch),
            type(exc).__name__,
        )
        out: list[Result] = []
        for item in batch:
            try:
                out += _isolate(stage, [item])
            except RunHalted as halt:
                halt.results = [r for r in [*out, *halt.results] if r.status == "ok"]
                raise
        return out
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


def result_rows(
    batch: list[Item], results: list[Result], drop_previous: bool = False
) -> list[dict[str, Any]]:
    """Ledger rows for the results of a batch (attempt, ``seq`` and fingerprint come from the items).

    A redo (forced, or of a stale item) that fails never destroys the good result it was to
    replace: after the failure row comes a copy of the previous ok row (reason ``kept_previous``,
    the failure in its message), so that row stays current, unless ``drop_previous``.
    """
    by_id = {item.clip_id: item for item in batch}
    rows = []
    for res in results:
        item = by_id[res.clip_id]
        if item.refresh and (res.status != "ok" or not res.layer):
            # Only the layer was to be made and it was not: the row stays as it is (its layer
            # still stale, so the next plain run tries again); no attempt is spent on the row.
            log.warning(
                "%s: layer of %s not made: %s %s", "refresh", res.clip_id, res.reason, res.message[:300]
            )
            continue
        row = {
            **res.outputs,  # first: the row's own fields below win over a copied previous row's
            "clip_id": res.clip_id,
            "status": res.status,
            "reason": res.reason,
            "message": res.message,
            "attempts": item.attempt,
            "seq": item.seq + 1,
            "fingerprint": item.fingerprint,
            "layer_fingerprint": item.layer_fingerprint if res.status == "ok" and res.layer else None,
        }
        rows.append(row)
        if res.status != "ok" and item.previous is not None and not drop_previous:
            rows.append(
                {
                    **item.previous,
                    "clip_id": res.clip_id,
                    "status": "ok",
                    "reason": KEPT_PREVIOUS,
                    "message": f"the redo failed ({res.reason}): {res.message}"[:2000],
                    "attempts": item.attempt,
                    "seq": item.seq + 2,
                }
            )
    return rows


def partial_rows(batch: list[Item], exc: AbortRun, drop_previous: bool = False) -> list[dict[str, Any]]:
    """Ledger rows for the results an aborting ``process`` finished first (items of ``batch``
    only); the items without one keep their current row, so an item never tried loses no attempt."""
    ids = {item.clip_id for item in batch}
    results = [r for r in exc.results if isinstance(r, Result) and r.clip_id in ids]
    return result_rows(batch, results, drop_previous)


def process_and_commit(
    stage: ItemStage,
    ledger: Ledger,
    batch: list[Item],
    part_name: str | None = None,
    drop_previous: bool = False,
) -> list[dict[str, Any]]:
    """Process one batch and commit its rows (the rename is the commit: a crash loses this batch
    at most). Returns one small summary per item for the driver."""
    try:
        rows = result_rows(batch, run_batch(stage, batch), drop_previous)
    except AbortRun as exc:
        if rows := partial_rows(batch, exc, drop_previous):
            _commit(ledger, rows, part_name)
        raise
    _commit(ledger, rows, part_name)
    return _summaries(rows)


def _commit(ledger: Ledger, rows: list[dict[str, Any]], name: str | None = None) -> None:
    """Commit ``rows``; a disk that cannot take them stops the run with :class:`RunHalted` (their
    items get no row: the next run redoes them)."""
    try:
        ledger.commit(rows, name=name)
    except Exception as exc:
        if (found := machine_cause(exc)) is None:
            raise
        n = len({r["clip_id"] for r in rows})
        raise halt_for(
            *found,
            [ledger.folder],
            f"committing to {ledger.folder}",
            f"the last {n} finished items could not be committed and are redone by the next run; "
            "earlier ones are committed",
        ) from exc


def _summaries(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per item for the driver: the outcome of the attempt (a kept previous row only
    moves the item's ``seq`` on)."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["reason"] == KEPT_PREVIOUS and r["clip_id"] in out:
            out[r["clip_id"]]["seq"] = r["seq"]
        else:
            out[r["clip_id"]] = {k: r[k] for k in ("clip_id", "status", "attempts", "seq")}
    return list(out.values())


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
        self.drop_previous = options.drop_previous
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
            rows, self.buffer = self.buffer, []  # a commit that fails leaves them to the next run
            _commit(self.ledger, rows)
        self.last_commit = time.monotonic()

    def run_pass(self, todo: WorkList) -> Iterator[list[dict[str, Any]]]:
        cfg = self.stage.stage_config
        for batch in todo.batches(cfg.batch_size):
            try:
                rows = result_rows(batch, run_batch(self.stage, batch), self.drop_previous)
            except AbortRun as exc:
                # committed by __exit__'s flush
                self.buffer.extend(partial_rows(batch, exc, self.drop_previous))
                raise
            self.buffer.extend(rows)
            due = time.monotonic() - self.last_commit >= cfg.commit_interval_s
            if due or len(self.buffer) >= self.MAX_BUFFERED_ROWS:
                self.flush()
            yield _summaries(rows)
        self.flush()
