"""The per-stage ledger: every item ends in exactly one current row.

Rows are appended as Parquet part files, each written to a temporary name and renamed (the rename
is the commit), so a crash loses at most the batch in flight and never leaves a partial part that
a reader would take. The current state of an item is its row with the highest ``seq``. The folder is
plain Parquet: ``pandas.read_parquet(DIR/NN-stage/ledger)`` reads it with no tool of ours.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.io import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

BASE_COLUMNS = ("clip_id", "status", "reason", "message", "attempts", "seq", "updated_at")


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
    ]


class Ledger:
    def __init__(self, folder: Path, outputs: list[pa.Field] | None = None) -> None:
        self.folder = Path(folder)
        self.outputs = outputs or []
        self._finish_replace()

    @property
    def schema(self) -> pa.Schema:
        import pyarrow as pa

        return pa.schema(base_fields() + list(self.outputs))

    def parts(self) -> list[Path]:
        if not self.folder.exists():
            return []
        return sorted(p for p in self.folder.glob("part-*.parquet") if p.is_file())

    def exists(self) -> bool:
        return bool(self.parts())

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        import pyarrow as pa

        now = time.time_ns()
        full = []
        for i, row in enumerate(rows):
            r = {name: row.get(name) for name in self.schema.names}
            r["seq"] = now + i  # ordering across parts: later commits win
            r["updated_at"] = now // 1000
            full.append(r)
        return pa.Table.from_pylist(full, schema=self.schema)

    def _write(self, folder: Path, table: pa.Table, name: str | None = None) -> Path:
        import pyarrow.parquet as pq

        dest = folder / f"part-{name or f'{time.time_ns():020d}-{uuid.uuid4().hex[:8]}'}.parquet"
        with atomic_path(dest) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return dest

    def commit(self, rows: list[dict[str, Any]], name: str | None = None) -> None:
        """Append rows as one part file; atomic.

        A deterministic ``name`` makes the commit idempotent: a batch redone by a retried worker
        task replaces its own part instead of adding a second copy of its rows.
        """
        if rows:
            self._write(self.folder, self._table(rows), name)

    def read_all(self) -> pd.DataFrame:
        """Every row ever committed (the history), as a DataFrame."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = self.parts()
        if not parts:
            return pd.DataFrame({name: pd.Series(dtype="object") for name in self.schema.names})
        tables = [pq.read_table(p) for p in parts]
        table = pa.concat_tables(tables, promote_options="permissive")
        return table.to_pandas(types_mapper=None)

    def latest(self) -> pd.DataFrame:
        """One row per clip: its most recent state, indexed by ``clip_id``."""
        df = self.read_all()
        if df.empty:
            return df.set_index("clip_id", drop=False)
        df = df.sort_values("seq", kind="stable").drop_duplicates("clip_id", keep="last")
        return df.set_index("clip_id", drop=False)

    def compact(self) -> None:
        """Rewrite the parts as one file holding only the latest rows (after a run)."""
        import pyarrow as pa

        parts = self.parts()
        if len(parts) < 2:
            return
        latest = self.latest().reset_index(drop=True)
        table = pa.Table.from_pandas(latest, preserve_index=False)
        # Write the compacted part first; the old parts' rows are older (lower seq), so a crash
        # between the write and the removals leaves a ledger that still reads correctly.
        self._write(self.folder, table.cast(table.schema))
        for p in parts:
            p.unlink(missing_ok=True)

    # -- whole replacement (stage 0 rebuilt with --force) ----------------------------------------
    def replace_all(self, rows: list[dict[str, Any]]) -> None:
        """Replace the whole ledger with ``rows``, atomically at folder level."""
        new = self.folder.with_name(self.folder.name + ".new")
        if new.exists():
            shutil.rmtree(new)
        new.mkdir(parents=True)
        self._write(new, self._table(rows))
        old = self.folder.with_name(self.folder.name + ".old")
        if self.folder.exists():
            self.folder.rename(old)
        new.rename(self.folder)
        if old.exists():
            shutil.rmtree(old)

    def _finish_replace(self) -> None:
        """Complete or roll back a replacement interrupted by a crash."""
        new = self.folder.with_name(self.folder.name + ".new")
        old = self.folder.with_name(self.folder.name + ".old")
        if not self.folder.exists():
            if new.exists() and any(new.glob("part-*.parquet")):
                new.rename(self.folder)  # crashed between the two renames: finish the swap
            elif old.exists():
                old.rename(self.folder)
        for leftover in (new, old):
            if leftover.exists() and self.folder.exists():
                shutil.rmtree(leftover)
