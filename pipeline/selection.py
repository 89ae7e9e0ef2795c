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


def eligible_table(stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = ()) -> pa.Table:
    """The clips ``stage`` applies to (ok upstream, kept by ``select``): ``clip_id`` and the
    upstream ``columns`` asked for (e.g. ``split``), as Arrow."""
    cols = list(dict.fromkeys([*stage.selection_columns, *columns]))
    table = selected(stage, upstream_ok(type(stage), ctx, cols))
    return table.select(["clip_id", *[c for c in columns if c in table.column_names]])


def eligible_frame(
    stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """:func:`eligible_table` as pandas, indexed by ``clip_id``."""
    return to_pandas(eligible_table(stage, ctx, columns)).set_index("clip_id", drop=False)


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
