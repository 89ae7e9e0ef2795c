"""Which items a stage works on, read from the ledgers: the engine's public API for reading runs.

- :func:`stage_ledger`: a stage's ledger with its declared schema (typed reads).
- :func:`upstream_ok`, :func:`eligible_frame`: the clips that are ok in every ancestor of a stage
  (joined by ``clip_id``) and the ones the stage's ``select`` keeps.
- :func:`select_pending` and :class:`WorkList`: what a run has still to do, and its items, built
  one batch at a time.

Selection is vectorized over Arrow/pandas columns and the items' data is materialized one batch at
a time, so a run of millions of clips reaches its first batch in seconds. Stages, status and the
executors read through this module; it drives nothing (the runner does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.ledger import Ledger, to_pandas
from pipeline.registry import ancestors
from pipeline.sharding import in_shard
from pipeline.stage import Item, ItemStage, RunContext, RunOptions, Stage

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


def stage_ledger(stage: Stage | type[Stage], workdir: Path | None = None) -> Ledger:
    """The ledger of a stage (an instance, or a class and the run folder), with its schema."""
    if workdir is not None:
        folder = workdir / stage.dirname()
    elif isinstance(stage, Stage):
        folder = stage.folder
    else:
        raise TypeError(f"stage_ledger({stage.__name__}) needs the run folder")
    return Ledger(folder / "ledger", stage.output_schema())


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
#: Column of :func:`upstream_ok`'s table: the fingerprint the direct upstream row has (or would have,
#: redone with today's settings). A row of the stage made now from it gets ``chain(settings, this)``.
UPSTREAM_FP = "__upstream_fp"


def upstream_ok(
    cls: type[Stage], ctx: RunContext, columns: list[str] | None = None, current_only: bool = True
) -> pa.Table:
    """``clip_id`` plus ``columns`` (None: every output column) of the clips that are ok in every
    ancestor of ``cls``, joined by ``clip_id``, in clip-table order, with :data:`UPSTREAM_FP`.

    ``current_only`` (what a run consumes): only clips whose row is current in every ancestor (its
    fingerprint is the one today's settings give: :mod:`pipeline.fingerprint`); a stale upstream
    row waits for its own stage to be redone. Without it (what status counts), stale upstream rows
    count too, and :data:`UPSTREAM_FP` is the fingerprint they would have once redone.
    """
    import pyarrow.compute as pc

    from pipeline.fingerprint import chain, settings_fingerprint

    table: pa.Table | None = None
    expected = None
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
        state = ledger.latest_table(["status", "fingerprint", *want])
        state = state.filter(pc.equal(state["status"], "ok"))
        if table is None:  # the clip table: its rows' fingerprints are of their content
            table = state.select(["clip_id", *want])
            expected = state["fingerprint"].combine_chunks()
            continue
        assert expected is not None  # set with the clip table, the first ancestor
        clash = set(want) & set(table.column_names)
        if clash:
            raise AbortRun(f"stage {anc_cls.dirname()} outputs clash with upstream columns: {sorted(clash)}")
        idx = pc.index_in(table["clip_id"], value_set=state["clip_id"].combine_chunks())
        keep = pc.is_valid(idx)
        table, idx, expected = table.filter(keep), idx.filter(keep), expected.filter(keep)
        expected = chain(settings_fingerprint(anc_cls(ctx)), expected)
        if current_only:
            actual = state["fingerprint"].take(idx)
            current = pc.or_kleene(pc.is_null(actual), pc.equal(actual, expected))
            table, idx, expected = table.filter(current), idx.filter(current), expected.filter(current)
        for name in want:
            table = table.append_column(state.schema.field(name), state[name].take(idx))
    if table is None:
        raise AbortRun(f"stage {cls.dirname()} has no upstream stage to take items from")
    return table.append_column(UPSTREAM_FP, expected)


def expected_fingerprints(stage: Stage, upstream: pa.Table) -> pa.Array:
    """The fingerprint a row of ``stage`` made now from each clip of ``upstream`` gets."""
    from pipeline.fingerprint import chain, settings_fingerprint

    return chain(settings_fingerprint(stage), upstream[UPSTREAM_FP])


def selected(stage: ItemStage, table: pa.Table) -> pa.Table:
    """The rows of ``table`` (upstream clips) that ``stage.select`` keeps."""
    import numpy as np

    if not stage.selection_columns or table.num_rows == 0:
        return table
    frame = to_pandas(table.select(["clip_id", *stage.selection_columns])).set_index("clip_id", drop=False)
    mask = stage.select(frame)
    if mask is None:
        return table
    return table.filter(np.asarray(mask, dtype=bool))


def eligible_table(
    stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = (), current_only: bool = True
) -> pa.Table:
    """The clips ``stage`` applies to (ok upstream, kept by ``select``): ``clip_id``, the upstream
    ``columns`` asked for (e.g. ``split``) and :data:`UPSTREAM_FP`, as Arrow."""
    cols = list(dict.fromkeys([*stage.selection_columns, *columns]))
    table = selected(stage, upstream_ok(type(stage), ctx, cols, current_only))
    return table.select(["clip_id", *[c for c in columns if c in table.column_names], UPSTREAM_FP])


def eligible_frame(
    stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """:func:`eligible_table` as pandas, indexed by ``clip_id``."""
    return to_pandas(eligible_table(stage, ctx, columns).drop_columns([UPSTREAM_FP])).set_index(
        "clip_id", drop=False
    )


def expected_table(cls: type[Stage], ctx: RunContext) -> pa.Table:
    """``clip_id`` and ``expected``: the fingerprint a row of item stage ``cls`` would get if made
    now, for every clip it applies to (stale upstream rows included, as if redone)."""
    import pyarrow as pa

    stage = cls(ctx)
    if not isinstance(stage, ItemStage):
        raise TypeError(f"expected_table: {cls.dirname()} is not an item stage")
    eligible = eligible_table(stage, ctx, current_only=False)
    return pa.table({"clip_id": eligible["clip_id"], "expected": expected_fingerprints(stage, eligible)})


def stale_ids(cls: type[Stage], ctx: RunContext) -> set[str]:
    """Clips whose current row of item stage ``cls`` is ok but stale: made from other settings or
    other upstream rows than a run would use today (:mod:`pipeline.fingerprint`)."""
    import pyarrow.compute as pc

    ledger = stage_ledger(cls, ctx.workdir)
    if not ledger.exists():
        return set()
    try:
        expected = expected_table(cls, ctx)
    except AbortRun:  # an upstream stage has not run: nothing to compare with
        return set()
    state = ledger.latest_table(["status", "fingerprint"])
    idx = pc.index_in(state["clip_id"], value_set=expected["clip_id"].combine_chunks())
    want = expected["expected"].combine_chunks().take(idx)
    ok = pc.equal(state["status"], "ok")
    stale = pc.and_(ok, pc.not_equal(state["fingerprint"], want)).fill_null(False)
    return set(state["clip_id"].filter(stale).to_pylist())


# -- what is pending ------------------------------------------------------------------------------
def select_pending(
    eligible_ids: pa.Array | list[str],
    state: pa.Table,
    options: RunOptions,
    max_attempts: int,
    expected: pa.Array | None = None,
) -> pd.DataFrame:
    """The items to work on, in ``eligible_ids`` order: ``clip_id``, ``attempt``, ``seq`` (the seq
    of the row each one supersedes), ``fingerprint`` (what its new row gets: ``expected``, aligned
    with ``eligible_ids``) and ``redo`` (it is ok now: a forced or stale redo). ``state`` is the
    stage's current rows (clip_id, status, attempts, seq, fingerprint). An ok item whose
    fingerprint is not the expected one is stale and redone; a null fingerprint is taken as current.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(eligible_ids, type=pa.string()) if isinstance(eligible_ids, list) else eligible_ids
    if expected is None:
        expected = pa.nulls(len(ids), pa.string())
    if options.shard is not None:
        keep = pa.array([in_shard(c, options.shard) for c in ids.to_pylist()], type=pa.bool_())
        ids, expected = ids.filter(keep), expected.filter(keep)
    idx = pc.index_in(ids, value_set=state["clip_id"].combine_chunks())
    has_row = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    status = state["status"].take(idx).fill_null("").to_numpy(zero_copy_only=False)
    tries = state["attempts"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    seq = state["seq"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if "fingerprint" in state.column_names:
        actual = state["fingerprint"].take(idx)
        differs = pc.and_(pc.is_valid(actual), pc.not_equal(actual, expected.cast(pa.string())))
        stale = (status == "ok") & differs.fill_null(False).to_numpy(zero_copy_only=False)
    else:
        stale = np.zeros(len(ids), dtype=bool)
    if options.force:
        pending = np.ones(len(ids), dtype=bool)
        attempt = np.ones(len(ids), dtype=np.int64)
    elif options.retry_failed:
        pending = ~has_row | (status != "ok") | stale
        attempt = np.ones(len(ids), dtype=np.int64)
    else:
        retryable = (status != "ok") & (status != "failed_permanent") & (tries < max_attempts)
        pending = ~has_row | retryable | stale
        attempt = np.where(has_row & ~stale, tries + 1, 1)
    out = pd.DataFrame(
        {
            "clip_id": ids.filter(pa.array(pending)).to_pylist(),
            "attempt": attempt[pending],
            "seq": seq[pending],
            "fingerprint": expected.filter(pa.array(pending)).to_pylist(),
            "redo": (status == "ok")[pending],
        }
    )
    if options.limit is not None:
        out = out.head(options.limit)
    return out


class WorkList:
    """The items of one pass, their data kept as an Arrow table and turned into :class:`Item`
    objects one batch at a time (millions of items never sit in memory as Python objects)."""

    def __init__(
        self,
        data: pa.Table,
        attempts: list[int],
        seqs: list[int],
        fingerprints: list[str | None] | None = None,
        previous: pa.Table | None = None,
    ) -> None:
        self.data = data  # clip_id + upstream columns, one row per item
        self.attempts = attempts
        self.seqs = seqs
        self.fingerprints = fingerprints or [None] * len(attempts)
        self.previous = previous  # a redo's current ok row (null row otherwise), aligned with data

    @classmethod
    def of(cls, upstream: pa.Table, pending: pd.DataFrame, current: pa.Table | None = None) -> WorkList:
        """The pending items' data from ``upstream``; ``current`` (the stage's current rows) gives
        the previous ok row of each redo (``pending.redo``)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = pa.array(pending["clip_id"].tolist(), type=pa.string())
        data = upstream.take(pc.index_in(ids, value_set=upstream["clip_id"].combine_chunks()))
        if UPSTREAM_FP in data.column_names:
            data = data.drop_columns([UPSTREAM_FP])
        previous = None
        if current is not None and bool(pending["redo"].any()):
            redo_ids = pa.array(
                [c if r else None for c, r in zip(pending["clip_id"], pending["redo"], strict=True)],
                pa.string(),
            )
            previous = current.take(pc.index_in(redo_ids, value_set=current["clip_id"].combine_chunks()))
        return cls(
            data,
            pending["attempt"].tolist(),
            pending["seq"].tolist(),
            pending["fingerprint"].tolist(),
            previous,
        )

    def __len__(self) -> int:
        return self.data.num_rows

    def batches(self, size: int) -> Iterator[list[Item]]:
        for start in range(0, len(self), size):
            rows = self.data.slice(start, size).to_pylist()
            prev = (
                self.previous.slice(start, size).to_pylist()
                if self.previous is not None
                else [None] * len(rows)
            )
            yield [
                Item(
                    row.pop("clip_id"),
                    row,
                    int(self.attempts[start + k]),
                    int(self.seqs[start + k]),
                    self.fingerprints[start + k],
                    _previous(prev[k]),
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
        fps = [self.fingerprints[i] for i in idx.to_pylist()]
        return WorkList(
            self.data.take(idx),
            [int(r["attempts"]) + 1 for r in rows],
            [int(r["seq"]) for r in rows],
            fps,
            self.previous.take(idx) if self.previous is not None else None,
        )


def _previous(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A previous ok row as a redo keeps it: its output columns and fingerprint (no bookkeeping)."""
    if not row or row.get("clip_id") is None:
        return None
    drop = {"clip_id", "status", "reason", "message", "attempts", "seq", "updated_at"}
    return {k: v for k, v in row.items() if k not in drop}
