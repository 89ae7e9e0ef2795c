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
from dataclasses import dataclass
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
#: Column of :func:`upstream_ok`'s table: the legacy chain fingerprint the direct upstream row has
#: (or would have, redone with today's settings), for rows fingerprinted before values were.
UPSTREAM_FP = "__upstream_fp"
#: Schema metadata of :func:`upstream_ok`'s table: the settings fingerprints still to chain onto
#: :data:`UPSTREAM_FP` (JSON list). Chaining costs a hash per row and stage, and only rows made
#: before fingerprints followed values need it, so it is done when a ledger holds such rows.
LEGACY_PENDING = b"avcaps_legacy_pending"
#: Schema metadata of :func:`upstream_ok`'s table: per ancestor, its ok rows that are stale
#: (JSON ``{dirname: n}``): clips waiting for that stage to be redone.
HELD_BACK = b"avcaps_held_back"


def upstream_schema(cls: type[Stage]) -> pa.Schema:
    """``clip_id`` and every output column of the ancestors of ``cls`` (what its items can read)."""
    import pyarrow as pa

    fields = [pa.field("clip_id", pa.string())]
    for anc in ancestors(cls):
        fields += anc.output_schema()
    return pa.schema(fields)


def _reads(stage: Stage, schema: pa.Schema) -> list[str]:
    """What a row of ``stage`` is made from: its declared reads (all upstream columns when it
    declares none), each checked against the upstream schema."""
    reads = stage.reads() if isinstance(stage, ItemStage) else None
    if reads is None:
        return [n for n in schema.names if n != "clip_id"]
    unknown = [c for c in reads if c not in schema.names]
    if unknown:
        raise AbortRun(
            f"stage {stage.dirname()} reads {unknown}, which no earlier stage writes "
            f"(upstream columns: {', '.join(n for n in schema.names if n != 'clip_id')})"
        )
    return list(reads)


def fingerprint_columns(stage: Stage, schema: pa.Schema | None = None) -> list[str]:
    """The upstream columns whose values fingerprint a row of ``stage`` (file columns by their
    digest columns: :data:`pipeline.fingerprint.DIGEST_KEY`)."""
    from pipeline.fingerprint import value_columns

    schema = schema if schema is not None else upstream_schema(type(stage))
    return value_columns(_reads(stage, schema), schema)


def layer_columns(stage: ItemStage, schema: pa.Schema | None = None) -> list[str]:
    """The upstream columns whose values fingerprint the stage's layer."""
    from pipeline.fingerprint import value_columns

    schema = schema if schema is not None else upstream_schema(type(stage))
    unknown = [c for c in stage.layer_reads() if c not in schema.names]
    if unknown:
        raise AbortRun(
            f"stage {stage.dirname()}'s {stage.layer_name} read {unknown}, which no earlier stage writes"
        )
    return value_columns(stage.layer_reads(), schema)


def item_columns(stage: ItemStage) -> list[str]:
    """What a run of ``stage`` reads upstream: what its rows are made from (and the paths of its
    file columns), what its layer reads, what its items carry, what ``select`` looks at."""
    schema = upstream_schema(type(stage))
    reads = _reads(stage, schema)
    cols = [*reads, *fingerprint_columns(stage, schema), *stage.layer_reads(), *layer_columns(stage, schema)]
    return list(dict.fromkeys([*cols, *stage.carries(), *stage.selection_columns]))


def _is_current(actual: pa.Array, new: pa.Array, legacy: list[pa.Array]) -> pa.Array:
    """Per row: no fingerprint (older than fingerprints), the one made now, or a legacy chain
    fingerprint equal to one a legacy form of the stage gives now."""
    import pyarrow.compute as pc

    from pipeline.fingerprint import PREFIX

    fresh = pc.starts_with(actual, PREFIX).fill_null(False)
    same_new = pc.equal(actual, new).fill_null(False)
    same_old = (
        pc.equal(actual, legacy[0]).fill_null(False) if legacy else pc.equal(actual, new).fill_null(False)
    )
    for other in legacy[1:]:
        same_old = pc.or_(same_old, pc.equal(actual, other).fill_null(False))
    return pc.or_(pc.is_null(actual), pc.if_else(fresh, same_new, same_old))


def upstream_ok(
    cls: type[Stage], ctx: RunContext, columns: list[str] | None = None, current_only: bool = True
) -> pa.Table:
    """``clip_id`` plus ``columns`` (None: every output column) of the clips that are ok in every
    ancestor of ``cls``, joined by ``clip_id``, in clip-table order, with :data:`UPSTREAM_FP`, and
    (for an item stage) everything its rows and layer are made from (:func:`item_columns`).

    ``current_only`` (what a run consumes): only clips whose row is current in every ancestor (its
    fingerprint is the one today's settings and its inputs give: :mod:`pipeline.fingerprint`); a
    stale upstream row waits for its own stage to be redone. Without it (what status counts),
    stale upstream rows count too. Either way the table's metadata (:data:`HELD_BACK`) says how
    many clips each ancestor holds back as stale.
    """
    import json

    import pyarrow.compute as pc

    from pipeline.fingerprint import chain, settings_fingerprint, value_fingerprints

    chain_of = ancestors(cls)
    stages = [a(ctx) for a in chain_of]
    target = cls(ctx)
    full = upstream_schema(cls)
    needed = set(full.names if columns is None else columns)
    if isinstance(target, ItemStage):
        needed |= set(item_columns(target))
    # What each ancestor's rows are made from (its declared reads against the columns before it),
    # to tell which of its rows are current.
    made_from: dict[str, list[str]] = {}
    fields = [full.field("clip_id")]
    for anc in stages:
        made_from[anc.dirname()] = fingerprint_columns(anc, _schema(fields)) if fields[1:] else []
        needed |= set(made_from[anc.dirname()])
        fields += type(anc).output_schema()
    table: pa.Table | None = None
    legacy_fp = None
    pending: list[str] = []  # settings fingerprints not yet chained onto legacy_fp
    held: dict[str, int] = {}
    for anc_cls, anc in zip(chain_of, stages, strict=True):
        ledger = stage_ledger(anc_cls, ctx.workdir)
        # A stage that ran with nothing to do (no eligible clip) commits no row but writes its
        # stats: it has run, and passes on no clip.
        if not ledger.exists() and not (ctx.workdir / anc_cls.dirname() / "stats.json").exists():
            raise AbortRun(
                f"stage {anc_cls.dirname()} has not run yet in {ctx.workdir}: "
                f"run `avcaps run {anc_cls.number}` first"
            )
        outs = [f.name for f in anc_cls.output_schema()]
        want = [c for c in outs if c in needed]
        state = ledger.latest_table(["status", "fingerprint", *want])
        state = state.filter(pc.equal(state["status"], "ok"))
        if table is None:  # the clip table: its rows' fingerprints are of their content
            table = state.select(["clip_id", *want])
            legacy_fp = state["fingerprint"].combine_chunks()
            continue
        assert legacy_fp is not None  # set with the clip table, the first ancestor
        clash = set(want) & set(table.column_names)
        if clash:
            raise AbortRun(f"stage {anc_cls.dirname()} outputs clash with upstream columns: {sorted(clash)}")
        idx = pc.index_in(table["clip_id"], value_set=state["clip_id"].combine_chunks())
        keep = pc.is_valid(idx)
        table, idx, legacy_fp = table.filter(keep), idx.filter(keep), legacy_fp.filter(keep)
        new = value_fingerprints(settings_fingerprint(anc), table, made_from[anc_cls.dirname()])
        olds = [settings_fingerprint(anc, s) for s in anc.legacy_fingerprint_settings()]
        actual = state["fingerprint"].take(idx)
        legacy: list[pa.Array] = []
        if has_legacy(actual):  # rows from before values were fingerprinted: chain to compare
            legacy_fp, pending = chain_all(legacy_fp, pending), []
            legacy = [chain(old, legacy_fp) for old in olds]
        current = _is_current(actual, new, legacy)
        stale = pc.invert(current)
        if isinstance(target, ItemStage):  # only the clips the stage applies to wait for it
            stale = pc.and_(stale, _selects(target, table))
        held[anc_cls.dirname()] = int(pc.sum(stale).as_py() or 0)
        if legacy:
            legacy_fp = legacy[0]
        else:
            pending.append(olds[0])
        if current_only:
            table, idx, legacy_fp = table.filter(current), idx.filter(current), legacy_fp.filter(current)
        for name in want:
            table = table.append_column(state.schema.field(name), state[name].take(idx))
    if table is None:
        raise AbortRun(f"stage {cls.dirname()} has no upstream stage to take items from")
    table = table.append_column(UPSTREAM_FP, legacy_fp)
    meta = dict(table.schema.metadata or {})
    meta[LEGACY_PENDING] = json.dumps(pending).encode()
    meta[HELD_BACK] = json.dumps({k: v for k, v in held.items() if v}).encode()
    return table.replace_schema_metadata(meta)


def _schema(fields: list[pa.Field]) -> pa.Schema:
    import pyarrow as pa

    return pa.schema(fields)


def has_legacy(fingerprints: pa.Array | pa.ChunkedArray) -> bool:
    """Whether any of ``fingerprints`` is a legacy chain one (neither null nor over values)."""
    import pyarrow.compute as pc

    from pipeline.fingerprint import PREFIX

    return bool(pc.any(pc.invert(pc.starts_with(fingerprints, PREFIX))).as_py())


def chain_all(upstream: pa.Array | pa.ChunkedArray, settings: list[str]) -> pa.Array:
    """``upstream`` chained with each of ``settings`` in turn (:func:`pipeline.fingerprint.chain`)."""
    from pipeline.fingerprint import chain

    out = upstream.combine_chunks() if hasattr(upstream, "combine_chunks") else upstream
    for fp in settings:
        out = chain(fp, out)
    return out


def upstream_legacy(table: pa.Table) -> pa.Array:
    """Per clip of an :func:`upstream_ok` table: the legacy chain fingerprint its direct upstream
    row has (or would have, redone with today's settings)."""
    import json

    pending = json.loads((table.schema.metadata or {}).get(LEGACY_PENDING, b"[]"))
    return chain_all(table[UPSTREAM_FP], pending)


def held_back(table: pa.Table) -> dict[str, int]:
    """Per ancestor, the clips it holds back as stale (:data:`HELD_BACK` of an upstream table)."""
    import json

    raw = (table.schema.metadata or {}).get(HELD_BACK)
    return {str(k): int(v) for k, v in json.loads(raw).items()} if raw else {}


def waiting_line(held: dict[str, int]) -> str:
    """One line on the clips held back by stale upstream rows, and the command that redoes them
    (empty when none is)."""
    if not held:
        return ""
    parts = [f"{n} wait for stage {dirname}, whose rows of them are stale" for dirname, n in held.items()]
    first = next(iter(held))
    return (
        "; ".join(parts)
        + f" (made with other settings or from other inputs): run `avcaps run {int(first[:2])}` first"
    )


@dataclass
class Expected:
    """What rows of a stage made now from each clip of an upstream table get: their fingerprint,
    the legacy chain fingerprints that still count as current, and the layer's fingerprint."""

    rows: pa.Array
    legacy: list[pa.Array]
    layer: pa.Array

    def current(self, actual: pa.Array) -> pa.Array:
        return _is_current(actual, self.rows, self.legacy)

    def filter(self, mask: pa.Array) -> Expected:
        return Expected(
            self.rows.filter(mask), [x.filter(mask) for x in self.legacy], self.layer.filter(mask)
        )

    def take(self, idx: pa.Array) -> Expected:
        return Expected(self.rows.take(idx), [x.take(idx) for x in self.legacy], self.layer.take(idx))


def expected(stage: Stage, upstream: pa.Table, legacy_rows: bool = True) -> Expected:
    """The fingerprints rows of ``stage`` made now from each clip of ``upstream`` get
    (``legacy_rows``: whether the stage's ledger holds legacy rows, whose chain is then made)."""
    import pyarrow as pa

    from pipeline.fingerprint import chain, layer_fingerprints, settings_fingerprint, value_fingerprints

    schema = upstream_schema(type(stage))
    rows = value_fingerprints(settings_fingerprint(stage), upstream, fingerprint_columns(stage, schema))
    legacy: list[pa.Array] = []
    if legacy_rows:
        base = upstream_legacy(upstream)
        legacy = [chain(settings_fingerprint(stage, s), base) for s in stage.legacy_fingerprint_settings()]
    if isinstance(stage, ItemStage):
        layer = layer_fingerprints(
            stage.layer_settings(), stage, rows, upstream, layer_columns(stage, schema)
        )
    else:
        layer = pa.nulls(len(rows), pa.string())
    return Expected(rows, legacy, layer)


def _selects(stage: ItemStage, table: pa.Table) -> pa.Array:
    """``stage.select``'s mask over ``table`` (all true where it selects by columns not in it yet)."""
    import numpy as np
    import pyarrow as pa

    cols = stage.selection_columns
    if not cols or table.num_rows == 0 or not set(cols) <= set(table.column_names):
        return pa.array(np.ones(table.num_rows, dtype=bool))
    mask = stage.select(to_pandas(table.select(["clip_id", *cols])).set_index("clip_id", drop=False))
    return pa.array(np.ones(table.num_rows, dtype=bool) if mask is None else np.asarray(mask, dtype=bool))


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
    ``columns`` asked for (e.g. ``split``), what the stage's fingerprints hash (so
    :func:`expected` can be taken of it) and :data:`UPSTREAM_FP`, as Arrow, with the
    :data:`HELD_BACK` metadata."""
    cols = list(dict.fromkeys([*stage.selection_columns, *columns]))
    found = upstream_ok(type(stage), ctx, cols, current_only)
    table = selected(stage, found)
    schema = upstream_schema(type(stage))
    keep = [*columns, *fingerprint_columns(stage, schema), *layer_columns(stage, schema)]
    names = list(dict.fromkeys(["clip_id", *[c for c in keep if c in table.column_names], UPSTREAM_FP]))
    return table.select(names).replace_schema_metadata(found.schema.metadata)


def eligible_frame(
    stage: ItemStage, ctx: RunContext, columns: list[str] | tuple[str, ...] = ()
) -> pd.DataFrame:
    """:func:`eligible_table` as pandas, indexed by ``clip_id``."""
    return to_pandas(eligible_table(stage, ctx, columns).drop_columns([UPSTREAM_FP])).set_index(
        "clip_id", drop=False
    )


def expected_table(cls: type[Stage], ctx: RunContext) -> pa.Table:
    """``clip_id`` and ``expected``: the fingerprint a row of item stage ``cls`` would get if made
    now, for every clip it applies to (stale upstream rows included, as if redone), and
    ``legacy``, the legacy chain fingerprint that still counts as current."""
    import pyarrow as pa

    stage = cls(ctx)
    if not isinstance(stage, ItemStage):
        raise TypeError(f"expected_table: {cls.dirname()} is not an item stage")
    eligible = eligible_table(stage, ctx, current_only=False)
    exp = expected(stage, eligible)
    legacy = exp.legacy[0] if exp.legacy else pa.nulls(eligible.num_rows, pa.string())
    return pa.table({"clip_id": eligible["clip_id"], "expected": exp.rows, "legacy": legacy})


def stale_mask(state: pa.Table, ids: pa.Array, exp: Expected) -> pa.Array:
    """Per row of ``state`` (clip_id, status, fingerprint): ok but not current, against the
    expectation ``exp`` aligned with ``ids`` (a clip not among them is not stale)."""
    import pyarrow.compute as pc

    idx = pc.index_in(state["clip_id"], value_set=ids)
    known = pc.is_valid(idx)
    aligned = exp.take(idx.fill_null(0)) if len(ids) else None
    if aligned is None:
        return pc.and_(known, known)  # all false (no eligible clip)
    current = aligned.current(state["fingerprint"].combine_chunks())
    ok = pc.equal(state["status"], "ok")
    return pc.and_(pc.and_(known, ok), pc.invert(current)).fill_null(False)


def stale_ids(cls: type[Stage], ctx: RunContext) -> set[str]:
    """Clips whose current row of item stage ``cls`` is ok but stale: made from other settings or
    other values of what it reads than a run would use today (:mod:`pipeline.fingerprint`)."""
    ledger = stage_ledger(cls, ctx.workdir)
    if not ledger.exists():
        return set()
    stage = cls(ctx)
    if not isinstance(stage, ItemStage):
        return set()
    try:
        eligible = eligible_table(stage, ctx, current_only=False)
    except AbortRun:  # an upstream stage has not run: nothing to compare with
        return set()
    state = ledger.latest_table(["status", "fingerprint"])
    exp = expected(stage, eligible, has_legacy(state["fingerprint"]))
    mask = stale_mask(state, eligible["clip_id"].combine_chunks(), exp)
    return set(state["clip_id"].filter(mask).to_pylist())


# -- what is pending ------------------------------------------------------------------------------
def select_pending(
    eligible_ids: pa.Array | list[str],
    state: pa.Table,
    options: RunOptions,
    max_attempts: int,
    exp: Expected | None = None,
    can_refresh: bool = False,
) -> pd.DataFrame:
    """The items to work on, in ``eligible_ids`` order: ``clip_id``, ``attempt``, ``seq`` (the seq
    of the row each one supersedes), ``fingerprint`` and ``layer_fingerprint`` (what its new row
    gets: ``exp``, aligned with ``eligible_ids``), ``redo`` (it is ok now: a forced or stale redo)
    and ``refresh`` (its row is current, only its layer is to be made anew: ``can_refresh``).
    ``state`` is the stage's current rows (clip_id, status, attempts, seq, fingerprint,
    layer_fingerprint). An ok item whose row is not current is stale and redone.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.fingerprint import is_legacy

    ids = pa.array(eligible_ids, type=pa.string()) if isinstance(eligible_ids, list) else eligible_ids
    if exp is None:
        nulls = pa.nulls(len(ids), pa.string())
        exp = Expected(nulls, [], nulls)
    if options.shard is not None:
        keep = pa.array([in_shard(c, options.shard) for c in ids.to_pylist()], type=pa.bool_())
        ids, exp = ids.filter(keep), exp.filter(keep)
    idx = pc.index_in(ids, value_set=state["clip_id"].combine_chunks())
    has_row = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    status = state["status"].take(idx).fill_null("").to_numpy(zero_copy_only=False)
    tries = state["attempts"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    seq = state["seq"].take(idx).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    ok = status == "ok"
    stale = np.zeros(len(ids), dtype=bool)
    layer_stale = np.zeros(len(ids), dtype=bool)
    if "fingerprint" in state.column_names:
        actual = state["fingerprint"].take(idx)
        current = exp.current(actual).fill_null(True).to_numpy(zero_copy_only=False)
        stale = ok & ~current
        if "layer_fingerprint" in state.column_names:
            # A layer is stale where the stage has one now and the row's is another (or none);
            # a legacy row equal to its legacy form was made with today's layer settings too.
            have = state["layer_fingerprint"].take(idx)
            differs = pc.or_(pc.is_null(have), pc.not_equal(have, exp.layer)).fill_null(True)
            wants = pc.is_valid(exp.layer)
            legacy = np.array([is_legacy(a) for a in actual.to_pylist()], dtype=bool)
            layer_stale = (
                ok
                & current
                & ~legacy
                & pc.and_(wants, differs).fill_null(False).to_numpy(zero_copy_only=False)
            )
    refresh = layer_stale & can_refresh
    if options.force:
        pending = np.ones(len(ids), dtype=bool)
        attempt = np.ones(len(ids), dtype=np.int64)
        refresh = np.zeros(len(ids), dtype=bool)
    elif options.retry_failed:
        pending = ~has_row | (status != "ok") | stale | layer_stale
        attempt = np.ones(len(ids), dtype=np.int64)
    else:
        retryable = (status != "ok") & (status != "failed_permanent") & (tries < max_attempts)
        pending = ~has_row | retryable | stale | layer_stale
        attempt = np.where(has_row & ~stale & ~layer_stale, tries + 1, 1)
    mask = pa.array(pending)
    out = pd.DataFrame(
        {
            "clip_id": ids.filter(mask).to_pylist(),
            "attempt": attempt[pending],
            "seq": seq[pending],
            "fingerprint": exp.rows.filter(mask).to_pylist(),
            "layer_fingerprint": exp.layer.filter(mask).to_pylist(),
            "redo": ok[pending],
            "refresh": refresh[pending],
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
        layer_fingerprints: list[str | None] | None = None,
        refresh: list[bool] | None = None,
    ) -> None:
        self.data = data  # clip_id + upstream columns, one row per item
        self.attempts = attempts
        self.seqs = seqs
        self.fingerprints = fingerprints or [None] * len(attempts)
        self.previous = previous  # a redo's current ok row (null row otherwise), aligned with data
        self.layer_fingerprints = layer_fingerprints or [None] * len(attempts)
        self.refresh = refresh or [False] * len(attempts)

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
            pending["layer_fingerprint"].tolist() if "layer_fingerprint" in pending else None,
            [bool(r) for r in pending["refresh"]] if "refresh" in pending else None,
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
                    self.layer_fingerprints[start + k],
                    self.refresh[start + k],
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
        at = idx.to_pylist()
        return WorkList(
            self.data.take(idx),
            [int(r["attempts"]) + 1 for r in rows],
            [int(r["seq"]) for r in rows],
            [self.fingerprints[i] for i in at],
            self.previous.take(idx) if self.previous is not None else None,
            [self.layer_fingerprints[i] for i in at],
            [self.refresh[i] for i in at],
        )


def _previous(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A previous ok row as a redo keeps it: its output columns and fingerprint (no bookkeeping)."""
    if not row or row.get("clip_id") is None:
        return None
    drop = {"clip_id", "status", "reason", "message", "attempts", "seq", "updated_at"}
    # fingerprint and layer_fingerprint stay: a kept row keeps what it was made from
    return {k: v for k, v in row.items() if k not in drop}
