"""Benchmark: fingerprints over the values a stage reads (issue 25), at AudioSet scale.

Every ``avcaps status`` and run start fingerprints, per ancestor of a stage, the values each of
``BENCH_FP_ROWS`` (default 2,000,000) clips was made from, and compares a stage's rows with what a
run would make now. Two steps, each against the naive way in the same process, rounds A B A B:

1. ``values``: :func:`pipeline.fingerprint.value_fingerprints` (each cell as text built by Arrow,
   one hash per row) against the naive way, one ``json.dumps`` of the row's values per row (the
   first form of the function), on the columns stages read: strings and integers (stage 1:
   ``youtube_id``, ``start_s``, ``end_s``), a list of strings (stage 4: the captions), a float
   column (stage 2 reads ``video_duration_s``). Both are checked to give one fingerprint per
   distinct row.
2. ``legacy``: the legacy chains (a hash per row and stage, needed only for rows made before
   fingerprints followed values): :func:`pipeline.selection.chain_all` through 4 stages, which a
   status of stage 5 made for every ancestor before it skipped them on a run folder with no such row.

``make bench`` runs it (pytest); ``python tests/benchmarks/bench_fingerprints.py`` too. Record the
printed rows in BENCHMARKS.md with the date and the machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from pipeline.fingerprint import PREFIX, _canonical, digest, value_fingerprints
from pipeline.selection import chain_all

ROWS = int(os.environ.get("BENCH_FP_ROWS", "2000000"))


def naive_value_fingerprints(settings_fp: str, table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """The naive way: the row's values as one JSON object per row, hashed."""
    names = sorted(dict.fromkeys(columns))
    values = [table[c].to_pylist() for c in names]
    out = []
    for row in zip(*values, strict=True):
        text = json.dumps(dict(zip(names, map(_canonical, row), strict=True)), sort_keys=True, default=str)
        out.append(PREFIX + digest(settings_fp + "|" + text))
    return pa.array(out, pa.string())


def make_table(n: int) -> pa.Table:
    return pa.table(
        {
            "youtube_id": [f"{i:011d}" for i in range(n)],
            "start_s": list(range(n)),
            "end_s": list(range(10, n + 10)),
            "audio_captions": [["A dog barks while rain falls", f"Rain on a roof {i}"] for i in range(n)],
            "video_duration_s": [10.0 + (i % 997) * 1e-3 for i in range(n)],
        }
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def values(table: pa.Table) -> list[str]:
    lines = []
    n = table.num_rows
    for cols in (["youtube_id", "start_s", "end_s"], ["audio_captions"], ["video_duration_s"]):
        best: dict[str, float] = {}
        cells = zip(*(map(_canonical, table[c].to_pylist()) for c in cols), strict=True)
        distinct = len({json.dumps(row) for row in cells})
        for _ in range(2):  # A B A B
            for name, fn in (("naive", naive_value_fingerprints), ("ours", value_fingerprints)):
                dt, out = timed(lambda fn=fn, cols=cols: fn("s", table, cols))
                got = len(set(out.to_pylist()))
                assert got == distinct, f"{name}: {got} fingerprints for {distinct} distinct rows"
                best[name] = min(best.get(name, dt), dt)
        line = (
            f"values {'+'.join(cols)}, {n:,} rows: naive {best['naive']:.2f} s "
            f"({best['naive'] / n * 1e6:.2f} us/row), ours {best['ours']:.2f} s "
            f"({best['ours'] / n * 1e6:.2f} us/row), {best['naive'] / best['ours']:.1f}x"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


def legacy(table: pa.Table) -> list[str]:
    base = table["youtube_id"].combine_chunks()
    dt, _ = timed(lambda: chain_all(base, ["a", "b", "c", "d"]))
    line = (
        f"legacy chains through 4 stages, {table.num_rows:,} rows: {dt:.2f} s "
        f"({dt / table.num_rows * 1e6:.2f} us/row), skipped when no ledger holds a legacy row"
    )
    print(line, flush=True)
    return [line]


def test_fingerprints_at_scale() -> None:
    table = make_table(ROWS)
    values(table)
    legacy(table)


if __name__ == "__main__":
    test_fingerprints_at_scale()
