"""Percentile ranks over a stated population: numbers only, no model and no column names.

The quality scores of a run (CLIP, CLAP cosines) are published as percentiles because raw values
are not comparable across models; stage 5 orders and shows them, stage 6 exports them. Both rank
cells that are a number, a list of numbers (one per caption) or null, so the helpers live here,
below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def percentile_ranks(values: Any) -> Any:
    """Percentile (0-100) of each value among ``values``: the share of values at or below it.

    NaN stays NaN and is not counted. Ties share the highest rank, so the best score of a run
    is always 100 and a constant column is 100 everywhere.
    """
    import numpy as np

    v = np.asarray(values, dtype="float64")
    out = np.full(v.shape, np.nan)
    ok = ~np.isnan(v)
    finite = np.sort(v[ok])
    if finite.size:
        out[ok] = 100.0 * np.searchsorted(finite, v[ok], side="right") / finite.size
    return out


def _number(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if f != f else f  # NaN is no score


def _is_list(cell: Any) -> bool:
    return isinstance(cell, (list, tuple)) or type(cell).__name__ == "ndarray"


def cell_percentiles(cells: Sequence[Any]) -> list[Any]:
    """The percentile of every number in ``cells`` among all of them: each cell is a number, a
    list of numbers (flattened into the population: one value per caption) or None. The result
    has the cells' shape; a null or NaN stays None and is not counted."""
    flat: list[float | None] = []
    for cell in cells:
        if _is_list(cell):
            flat.extend(_number(x) for x in list(cell))
        else:
            flat.append(_number(cell))
    ranks = percentile_ranks([float("nan") if x is None else x for x in flat]) if flat else []
    out: list[Any] = []
    k = 0
    for cell in cells:
        if _is_list(cell):
            n = len(list(cell))
            out.append([None if r != r else float(r) for r in ranks[k : k + n]])
            k += n
        else:
            r = ranks[k]
            out.append(None if r != r else float(r))
            k += 1
    return out
