"""The per-stage ledger: every item ends in exactly one current row.

On disk a ledger is a folder of Parquet part files (``DIR/NN-stage/ledger/part-*.parquet``), plain
enough that ``pandas.read_parquet(folder)`` reads it with no tool of ours. The guarantees:

- **Atomic commits.** A part is written under a ``.tmp-`` name, fsynced, renamed into place and the
  folder fsynced: the rename is the commit, so a crash loses at most the batch in flight and no
  reader ever sees a partial part (readers, pyarrow's included, skip dot files).
- **Typed.** Every read is conformed to the declared Arrow schema: a column missing from an old
  part is filled with nulls, a legacy column written as double is cast back to its integer type,
  and pandas receives nullable integer dtypes (``Int32``...), so one failed row never turns an
  integer column into floats.
- **Clock-free order.** ``seq`` is a per-item counter: a new row of an item has ``seq`` one above
  the row it supersedes (the runner knows it, since two processes never work on one item at once).
  The current row of an item is its row with the highest ``seq``; ``updated_at`` is information
  only. Legacy ledgers, whose ``seq`` was a nanosecond clock, keep working: new rows count on.
- **Many writers.** Each commit is its own part file with a unique name, so concurrent writers
  never touch each other's files. Compaction merges the small parts under a lock that only
  compactors take; it writes the merged part before it removes the parts it read, and a reader
  that lists a part which is then removed simply lists again. A row present twice for a moment
  (in a merged part and in its source) has the same ``(clip_id, seq)`` and counts once.
- **Readers change nothing.** Reading never writes, renames or removes a file; recovering from an
  interrupted whole-table replacement is done by the next writer (:meth:`Ledger.recover`).
- **A damaged part is named, never a traceback.** A part that cannot be read (cut short by a bad
  copy, zero bytes, overwritten) raises :class:`DamagedLedger` (exit 2) naming it and what it held
  as far as its footer tells; inside :func:`tolerating_damage` (``avcaps status``) it is skipped
  and reported. :meth:`Ledger.quarantine` (``avcaps repair``) moves it to ``NN-stage/quarantine/``;
  the items whose rows it held then have no row (or their previous one) and are redone.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path, atomic_write_text, fsync_dir

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger("avcaps")

BASE_COLUMNS = (
    "clip_id",
    "status",
    "reason",
    "message",
    "attempts",
    "seq",
    "updated_at",
    "fingerprint",
    "layer_fingerprint",
)
# Parts below this size are merged by compaction; larger ones are left alone, so a long run
# rewrites each row a bounded number of times and a ledger of millions of rows has ~100 parts.
SMALL_PART_BYTES = 1 << 20
COMPACT_AT_PARTS = 64
UNIQUE_KEY = b"avcaps.unique_clip_ids"
_READ_RETRIES = 20
#: Where ``avcaps repair`` moves damaged parts: ``NN-stage/quarantine/`` (beside ``ledger/``).
QUARANTINE = "quarantine"


@dataclass(frozen=True)
class DamagedPart:
    """A part file that cannot be read, and what is known of it."""

    path: Path
    problem: str
    size: int | None = None
    rows: int | None = None  # from its footer, when the footer is readable
    clip_ids: tuple[str, ...] | None = None  # when its clip_id column still reads

    def describe(self, root: Path | None = None) -> str:
        inside = root is not None and self.path.is_relative_to(root)
        name = self.path.relative_to(root).as_posix() if inside and root else str(self.path)
        held = []
        if self.size is not None:
            held.append(f"{self.size:,} bytes")
        stamp = _part_time(self.path.name)
        if stamp:
            held.append(f"written {stamp}")
        if self.clip_ids is not None:
            held.append(f"rows of {len(self.clip_ids)} items")
        elif self.rows is not None:
            held.append(f"{self.rows} rows")
        else:
            held.append("rows unreadable")
        return f"{name} ({', '.join(held)}): {self.problem}"


def _part_time(name: str) -> str | None:
    """The commit time a part's name records (``part-<ns>-<hex>.parquet``), for people."""
    stem = name.removeprefix("part-").split("-", 1)[0]
    if len(stem) != 20 or not stem.isdigit():
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(int(stem) / 1e9))


class DamagedLedger(AbortRun):
    """Ledger parts that cannot be read: the run refuses (exit 2) until ``avcaps repair`` sets them
    aside, since their rows (which items are done) are unknown."""

    def __init__(self, parts: list[DamagedPart], root: Path | None = None) -> None:
        listed = "; ".join(p.describe(root) for p in parts[:3])
        more = f"; and {len(parts) - 3} more" if len(parts) > 3 else ""
        super().__init__(
            f"damaged ledger part{'s' if len(parts) > 1 else ''}: {listed}{more}. Run `avcaps repair` "
            "(with this run's --config) to move it to the stage's quarantine/ folder; the next run "
            "then redoes the items whose rows it held"
        )
        self.parts = parts


_TOLERATED: contextvars.ContextVar[list[DamagedPart] | None] = contextvars.ContextVar(
    "avcaps_tolerated_damage", default=None
)


@contextlib.contextmanager
def tolerating_damage() -> Iterator[list[DamagedPart]]:
    """Within the block, reads skip damaged parts (reading the rest) and add them to the list
    yielded, instead of raising :class:`DamagedLedger`: what ``avcaps status`` shows."""
    found: list[DamagedPart] = []
    token = _TOLERATED.set(found)
    try:
        yield found
    finally:
        _TOLERATED.reset(token)


def inspect_part(path: Path, problem: BaseException) -> DamagedPart:
    """What can still be told of an unreadable part: its size, its footer's row count, its items."""
    import pyarrow.parquet as pq

    size = rows = ids = None
    with contextlib.suppress(OSError):
        size = path.stat().st_size
    with contextlib.suppress(Exception):
        pf = pq.ParquetFile(path)
        rows = pf.metadata.num_rows
        ids = tuple(str(c) for c in pf.read(columns=["clip_id"])["clip_id"].to_pylist())
    text = str(problem).strip().splitlines()[0] if str(problem).strip() else type(problem).__name__
    text = text.split(". ")[0].rstrip(".")  # pyarrow adds "Either the file is corrupted or ..."
    return DamagedPart(path, text[:300], size, rows, ids)


def _is_damage(exc: BaseException) -> bool:
    """Whether a read error is the part's (not a vanished file, not the machine's)."""
    import pyarrow as pa

    from pipeline.machine import machine_cause

    if isinstance(exc, FileNotFoundError) or machine_cause(exc) is not None:
        return False
    # pyarrow's own errors (ArrowInvalid is also a ValueError), a disk's EIO, our "no clip_id".
    return isinstance(exc, (pa.ArrowException, OSError, ValueError))


def base_fields() -> list[pa.Field]:
    import pyarrow as pa

    return [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("seq", pa.int64()),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        # What the row was made from (pipeline.fingerprint); null on rows older than fingerprints.
        pa.field("fingerprint", pa.string()),
        # What the stage's layer (its scores) was made from; null: no layer, or not made.
        pa.field("layer_fingerprint", pa.string()),
    ]


def nullable_dtypes(arrow_type: pa.DataType) -> Any:
    """``types_mapper`` for ``to_pandas``: integers become pandas nullable integers (a null stays a
    null, not a float); everything else keeps pandas' default mapping."""
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        return {
            pa.int8(): pd.Int8Dtype(),
            pa.int16(): pd.Int16Dtype(),
            pa.int32(): pd.Int32Dtype(),
            pa.int64(): pd.Int64Dtype(),
            pa.uint8(): pd.UInt8Dtype(),
            pa.uint16(): pd.UInt16Dtype(),
            pa.uint32(): pd.UInt32Dtype(),
            pa.uint64(): pd.UInt64Dtype(),
        }[arrow_type]
    return None


def to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper=nullable_dtypes)


def _codes(table: pa.Table) -> Any:
    """One integer per distinct ``clip_id`` (dictionary codes over the whole column)."""
    import pyarrow.compute as pc

    return pc.dictionary_encode(table["clip_id"].combine_chunks()).indices.to_numpy()


def latest_indices(table: pa.Table) -> Any:
    """Row indices of the current row of every item (highest ``seq``), in first-seen order."""
    import numpy as np

    if table.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    codes = _codes(table)
    seq = table["seq"].fill_null(-1).to_numpy()
    order = np.lexsort((seq, codes))
    codes_sorted = codes[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = codes_sorted[1:] != codes_sorted[:-1]
    picked = order[last]
    # first-seen order of the items (the clip table's order for stage 0)
    return picked[np.argsort(codes[picked], kind="stable")]


class Ledger:
    """One stage's ledger folder. Constructing it touches no file."""

    def __init__(self, folder: Path | str, outputs: list[pa.Field] | None = None) -> None:
        self.folder = Path(folder)
        self.outputs = list(outputs or [])

    @property
    def schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema(base_fields() + self.outputs)

    # -- listing ---------------------------------------------------------------------------------
    def _source(self) -> Path:
        """The folder to read: the ledger, or, while a replacement is being swapped in (or was
        interrupted), the complete new table or else the old one."""
        if self.folder.exists():
            return self.folder
        new, old = self._sibling("new"), self._sibling("old")
        if new.exists() and any(new.glob("part-*.parquet")):
            return new
        return old if old.exists() else self.folder

    def _sibling(self, kind: str) -> Path:
        return self.folder.with_name(f"{self.folder.name}.{kind}")

    def parts(self) -> list[Path]:
        src = self._source()
        try:
            return sorted(
                src / e.name
                for e in os.scandir(src)
                if e.name.startswith("part-") and e.name.endswith(".parquet") and e.is_file()
            )
        except FileNotFoundError:
            return []

    def exists(self) -> bool:
        return bool(self.parts())

    # -- reading ---------------------------------------------------------------------------------
    def _conform(self, table: pa.Table, schema: pa.Schema) -> pa.Table:
        """``table`` with exactly ``schema``'s columns and types (nulls where a part lacks one)."""
        import pyarrow as pa

        cols = []
        for f in schema:
            if f.name in table.column_names:
                col = table[f.name]
                if col.type != f.type:
                    # Safe cast: a legacy double column of whole numbers becomes int again; a
                    # value that does not fit raises instead of being silently altered.
                    col = col.cast(f.type, safe=True)
                cols.append(col)
            else:
                cols.append(pa.nulls(table.num_rows, f.type))
        return pa.Table.from_arrays(cols, schema=schema)

    def _read_parts(self, parts: list[Path], columns: list[str] | None) -> tuple[pa.Table, bool]:
        """The rows of ``parts`` conformed to the schema, and whether they are known to hold one
        row per item (a single part whose writer recorded that its clip ids are unique). A part
        that cannot be read raises :class:`DamagedLedger`, or is skipped and recorded inside
        :func:`tolerating_damage`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        def one(path: Path) -> tuple[pa.Table, bool] | DamagedPart:
            try:
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                meta = pf.schema_arrow.metadata or {}
                table = pf.read(columns=[c for c in columns if c in names] if columns is not None else None)
                if "clip_id" not in table.column_names:
                    raise ValueError("no clip_id column")
            except Exception as exc:
                if not _is_damage(exc):
                    raise
                return inspect_part(path, exc)
            return table, meta.get(UNIQUE_KEY) == b"1"

        read: list[tuple[pa.Table, bool] | DamagedPart] = []
        if parts:
            with ThreadPoolExecutor(min(8, len(parts))) as pool:
                read = list(pool.map(one, parts))
        good = [(p, r) for p, r in zip(parts, read, strict=True) if not isinstance(r, DamagedPart)]
        damaged = [r for r in read if isinstance(r, DamagedPart)]
        schema = self.schema
        if not self.outputs:
            # No declared outputs (a reader outside the runner): the files add their columns.
            fields = {f.name: f for f in schema}
            for _, (t, _unique) in good:
                for f in t.schema:
                    fields.setdefault(f.name, f)
            schema = pa.schema(list(fields.values()))
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
        conformed = []
        for path, (t, _unique) in good:
            try:
                conformed.append(self._conform(t, schema))
            except Exception as exc:  # a column that cannot be what the schema says: damaged too
                if not _is_damage(exc):
                    raise
                damaged.append(inspect_part(path, exc))
        if damaged:
            tolerated = _TOLERATED.get()
            if tolerated is None:
                raise DamagedLedger(damaged, self.folder.parent.parent)
            tolerated += [d for d in damaged if d.path not in {t.path for t in tolerated}]
        if not conformed:
            return schema.empty_table(), True
        unique = len(read) == 1 and not damaged and good[0][1][1]
        return pa.concat_tables(conformed), unique

    def check(self) -> list[DamagedPart]:
        """Every part read whole (all columns, every page): the damaged ones (``avcaps repair``)."""
        found: list[DamagedPart] = []
        for path in self.parts():
            with tolerating_damage() as damaged:
                try:
                    self._read_parts([path], None)
                except FileNotFoundError:
                    continue  # compacted meanwhile
            found += damaged
        return found

    def quarantine(self, part: DamagedPart) -> Path:
        """Move a damaged part to ``NN-stage/quarantine/`` (never deleted), with a note of why. The
        caller holds the stage's lock (no writer of this ledger runs meanwhile)."""
        dest_dir = self.folder.parent / QUARANTINE
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / part.path.name
        if dest.exists():
            dest = dest_dir / f"{part.path.stem}-{time.time_ns()}{part.path.suffix}"
        note = {
            "part": part.path.name,
            "ledger": str(self.folder),
            "problem": part.problem,
            "bytes": part.size,
            "rows": part.rows,
            "clip_ids": list(part.clip_ids) if part.clip_ids is not None else None,
            "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_text(dest.with_name(dest.name + ".json"), json.dumps(note, indent=2) + "\n")
        os.replace(part.path, dest)  # the same filesystem: the stage folder
        fsync_dir(self.folder)
        fsync_dir(dest_dir)
        return dest

    def read(self, columns: list[str] | None = None, latest: bool = False) -> pa.Table:
        """Every committed row (or, with ``latest``, the current row of every item) as Arrow.

        ``columns`` limits what is read (``clip_id`` and ``seq`` are always included).
        """
        cols = None
        if columns is not None:
            cols = list(dict.fromkeys(["clip_id", "seq", *columns]))
        for attempt in range(_READ_RETRIES):
            try:
                table, unique = self._read_parts(self.parts(), cols)
                break
            except FileNotFoundError:
                # A compaction removed a part between our listing and our read: list again.
                time.sleep(0.01 * (attempt + 1))
        else:
            raise RuntimeError(f"{self.folder}: parts kept vanishing while reading the ledger")
        if unique:  # one row per item already (e.g. the clip table): nothing to pick
            return table
        if latest:
            return table.take(latest_indices(table))
        return _dedup(table)

    def latest_table(self, columns: list[str] | None = None) -> pa.Table:
        return self.read(columns, latest=True)

    def read_all(self) -> pd.DataFrame:
        """Every row ever committed (the history, as far as compaction kept it), as a DataFrame."""
        return to_pandas(self.read())

    def latest(self, columns: list[str] | None = None) -> pd.DataFrame:
        """One row per clip: its current state, indexed by ``clip_id`` (nullable integer dtypes)."""
        return to_pandas(self.latest_table(columns)).set_index("clip_id", drop=False)

    def current_seqs(self, clip_ids: Iterable[str]) -> dict[str, int]:
        wanted = set(clip_ids)
        state = self.latest_table(["clip_id", "seq"]).to_pydict()
        return {c: int(s or 0) for c, s in zip(state["clip_id"], state["seq"], strict=True) if c in wanted}

    # -- writing ---------------------------------------------------------------------------------
    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        import pyarrow as pa

        now = time.time_ns() // 1000
        names = self.schema.names
        full = [{name: row.get(name) for name in names} | {"updated_at": now} for row in rows]
        return pa.Table.from_pylist(full, schema=self.schema)

    def _write(self, folder: Path, table: pa.Table, name: str | None = None) -> Path:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        # Recording that a part holds one row per item spares readers of a one-part ledger (the
        # clip table of millions of clips) the work of picking each item's current row.
        if table.num_rows and pc.count_distinct(table["clip_id"]).as_py() == table.num_rows:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), UNIQUE_KEY: b"1"})
        dest = folder / f"part-{name or f'{time.time_ns():020d}-{uuid.uuid4().hex[:12]}'}.parquet"
        with atomic_path(dest) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return dest

    def commit(self, rows: list[dict[str, Any]], name: str | None = None) -> Path | None:
        """Append rows as one part file; atomic.

        Each row should carry ``seq`` (the superseded row's ``seq`` + 1: the runner sets it); rows
        without one get it from the ledger's current state. A deterministic ``name`` makes the
        commit idempotent: a batch redone by a retried worker task replaces its own part instead
        of adding a second copy of its rows.
        """
        if not rows:
            return None
        missing = [r["clip_id"] for r in rows if r.get("seq") is None]
        if missing:
            seqs = self.current_seqs(missing)
            rows = [
                r if r.get("seq") is not None else {**r, "seq": seqs.get(r["clip_id"], 0) + 1} for r in rows
            ]
        return self._write(self.folder, self._table(rows), name)

    # -- compaction ------------------------------------------------------------------------------
    def small_parts(self) -> list[Path]:
        out = []
        for p in self.parts():
            try:
                if p.stat().st_size < SMALL_PART_BYTES:
                    out.append(p)
            except FileNotFoundError:
                continue
        return out

    def compact(self, min_parts: int = 2) -> int:
        """Merge the small parts into one, keeping per item its current row and its last ok row.

        Only one process compacts a ledger at a time (others skip); commits by other writers go on
        meanwhile. The merged part is committed before the parts it replaces are removed, and a
        reader that lost a removed part lists again, so no reader ever misses a row. Returns the
        number of parts merged (0: nothing to do, or another process is compacting).
        """
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        from filelock import FileLock, Timeout

        if not self.folder.exists():
            return 0
        lock = FileLock(self.folder / ".compact.lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return 0
        try:
            parts = self.small_parts()
            if len(parts) < min_parts:
                return 0
            table, _ = self._read_parts(parts, None)
            keep = latest_indices(table)
            ok = np.flatnonzero(pc.equal(table["status"], "ok").to_numpy(zero_copy_only=False))
            if len(ok):
                keep_ok = ok[latest_indices(table.take(pa.array(ok)))]
                keep = np.union1d(keep, keep_ok)
            self._write(self.folder, table.take(pa.array(np.sort(keep))))
            for p in parts:
                p.unlink(missing_ok=True)
            fsync_dir(self.folder)
            return len(parts)
        finally:
            lock.release()

    def maybe_compact(self) -> int:
        """Compact when enough small parts have piled up (called during long runs)."""
        return self.compact(COMPACT_AT_PARTS) if len(self.parts()) >= COMPACT_AT_PARTS else 0

    # -- whole replacement (stage 0 rebuilt with --force) ----------------------------------------
    def replace_all(self, rows: list[dict[str, Any]] | pa.Table) -> None:
        """Replace the whole ledger, atomically at folder level (the caller holds the stage lock).

        The new table is written to ``ledger.new``; then ``ledger`` is renamed to ``ledger.old``
        and ``ledger.new`` to ``ledger``. A reader in between reads ``ledger.new`` (complete by
        then); a crash in between is finished by the next writer's :meth:`recover`.
        """
        import pyarrow as pa

        self.recover()
        new, old = self._sibling("new"), self._sibling("old")
        if new.exists():
            shutil.rmtree(new)
        new.mkdir(parents=True)
        table = rows if isinstance(rows, pa.Table) else self._table(rows)
        self._write(new, table)
        fsync_dir(new.parent)
        if self.folder.exists():
            self.folder.rename(old)
        new.rename(self.folder)
        fsync_dir(self.folder.parent)
        if old.exists():
            shutil.rmtree(old)

    def recover(self) -> None:
        """Writers only: finish or roll back a replacement interrupted by a crash, and remove the
        temp files of dead writers in the ledger folder."""
        from pipeline.io import clean_temp_files

        new, old = self._sibling("new"), self._sibling("old")
        if not self.folder.exists():
            if new.exists() and any(new.glob("part-*.parquet")):
                new.rename(self.folder)  # crashed between the two renames: finish the swap
            elif old.exists():
                old.rename(self.folder)
            fsync_dir(self.folder.parent)
        for leftover in (new, old):
            if leftover.exists() and self.folder.exists():
                shutil.rmtree(leftover)
        clean_temp_files(self.folder, recursive=False)


def _dedup(table: pa.Table) -> pa.Table:
    """Drop repeated ``(clip_id, seq)`` rows (a part read at the same time as its merged copy)."""
    import numpy as np
    import pyarrow as pa

    if table.num_rows < 2:
        return table
    codes = _codes(table)
    seq = table["seq"].fill_null(-1).to_numpy()
    keys = np.stack([codes.astype(np.int64), seq])
    _, first = np.unique(keys, axis=1, return_index=True)
    if len(first) == table.num_rows:
        return table
    return table.take(pa.array(np.sort(first)))
