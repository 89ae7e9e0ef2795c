"""Fingerprints: every ledger row knows what it was made from.

A row's ``fingerprint`` hashes the stage's settings that change its output (what the stage's
``fingerprint_settings()`` declares: model and revision, prompt hash, decoding parameters...)
and **the values of the upstream columns the stage reads** (``ItemStage.reads()``), for that
item. A column that names a file counts by the file's content: its field carries the name of the
column where the stage that writes it records the file's digest (:data:`DIGEST_KEY`), and that
digest is hashed instead of the path. So a redo upstream that gives the same values (the same
caption text, the same keyframe bytes) leaves every later row current, and one that changes a
value makes exactly the rows that read it stale. The clip table's rows are fingerprinted by their
content.

An item is **current** at a stage when its row's fingerprint equals the one a run would give it
now; otherwise it is **stale**: ``avcaps status`` counts it, a plain ``avcaps run`` redoes it,
and no later stage takes it as input until it is redone.

A stage may have a **layer**: output columns it can recompute on their own (quality scores), with
a ``layer_fingerprint`` of their own (the layer's settings, the row's fingerprint, and the values
of the columns the layer reads). A layer that is not current is refreshed in place (the stage's
``refresh``): the row keeps its fingerprint, so nothing downstream goes stale.

Rows fingerprinted before this scheme (a chain: the settings hashed with the upstream row's
fingerprint, :func:`chain`) keep working: such a row is current when it equals the chain that
today's settings of the stage as it was then give (``legacy_fingerprint_settings``). Rows with no
fingerprint at all count as current: nothing says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.stage import Stage

_DIGEST = 8  # bytes: 16 hex characters, plenty to tell settings and inputs apart
#: Prefix of a fingerprint over the values read (a legacy chain fingerprint has none).
PREFIX = "r:"
#: Field metadata key: the output column holding the digest of the file this column names.
DIGEST_KEY = b"digest"


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_DIGEST).hexdigest()


def settings_fingerprint(stage: Stage, settings: dict[str, Any] | None = None) -> str:
    """The stage's name and the settings it declares, hashed (keys sorted, JSON); ``settings``:
    others than it declares now (what an earlier version of the stage declared, to recognise the
    rows it made)."""
    settings = stage.fingerprint_settings() if settings is None else settings
    return digest(json.dumps({"stage": stage.dirname(), **settings}, sort_keys=True, default=str))


def chain(settings_fp: str, upstream: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Per item, the legacy fingerprint of a row made with ``settings_fp`` from an upstream row
    whose fingerprint is ``upstream`` (null upstream: an empty string, so legacy rows chain too)."""
    import pyarrow as pa

    prefix = settings_fp + "|"
    return pa.array([digest(prefix + (u or "")) for u in upstream.to_pylist()], pa.string())


def is_legacy(fingerprint: str | None) -> bool:
    return fingerprint is not None and not fingerprint.startswith(PREFIX)


def value_columns(columns: Sequence[str], schema: pa.Schema) -> list[str]:
    """The columns whose values are hashed for ``columns``: a file column by its digest column."""
    out = []
    for name in columns:
        field = schema.field(name) if name in schema.names else None
        meta = (field.metadata or {}) if field is not None else {}
        out.append(meta[DIGEST_KEY].decode() if DIGEST_KEY in meta else name)
    return list(dict.fromkeys(out))


def _canonical(value: Any) -> Any:
    """Cells as JSON sees them the same whatever their Arrow type was read as (float32 vs 64)."""
    if isinstance(value, float):
        return float(f"{value:.7g}")
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def value_fingerprints(settings_fp: str, table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """Per row of ``table``: ``r:`` + the hash of ``settings_fp``, the column names (sorted) and
    the row's values of ``columns``, each cell as unambiguous text (:func:`_cell_texts`).

    The texts are built column-wise by Arrow; only the hash is per row in Python (~1 µs), so a
    status over 2M clips stays in seconds."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = sorted(dict.fromkeys(columns))
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise KeyError(f"fingerprint columns not read: {missing}")
    prefix = f"{settings_fp}|{chr(0x1F).join(names)}|".encode()
    if not names:
        return pa.array([PREFIX + _hash(prefix)] * table.num_rows, pa.string())
    parts = [_cell_texts(table[c].combine_chunks()) for c in names]
    text = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x1e")
    return pa.array([PREFIX + _hash(prefix + t) for t in text.cast(pa.binary()).to_pylist()], pa.string())


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=_DIGEST).hexdigest()


def _cell_texts(col: pa.Array) -> pa.Array:
    """Each cell of ``col`` as text no other cell gives: a string as ``s<length>:<text>``, an
    integer or a boolean as ``i<value>``, a float as ``f<its float32 bits>``, a list of those as
    ``[<n>:`` and its items' texts joined by commas, null as ``\x00``; any other type as JSON."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        length = pc.utf8_length(col).cast(pa.string())
        out = pc.binary_join_element_wise(pa.scalar("s"), length, pa.scalar(":"), col.cast(pa.string()), "")
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        out = pc.binary_join_element_wise(pa.scalar("i"), col.cast(pa.string()), "")
    elif pa.types.is_floating(t):
        # As float32 bits: a number reads the same whether it was stored as float32 or float64.
        bits = col.cast(pa.float32(), safe=False).view(pa.int32()).cast(pa.string())
        out = pc.binary_join_element_wise(pa.scalar("f"), bits, "")
    elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and _plain(t.value_type):
        items = _cell_texts(pc.list_flatten(col))
        counts = pc.list_value_length(col).fill_null(0)
        offsets = pa.concat_arrays([pa.array([0], pa.int32()), pc.cumulative_sum(counts).cast(pa.int32())])
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, items), ",")
        n = pc.list_value_length(col).cast(pa.string())
        out = pc.binary_join_element_wise(pa.scalar("["), n, pa.scalar(":"), joined, "")
    else:
        values = [json.dumps(_canonical(v), sort_keys=True, default=str) for v in col.to_pylist()]
        return pa.array(["j" + v for v in values], pa.string()).fill_null("\x00")
    return out.fill_null("\x00")


def _plain(t: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_floating(t)
    )


def layer_fingerprints(
    settings: dict[str, Any] | None, stage: Stage, rows: pa.Array, table: pa.Table, columns: Sequence[str]
) -> pa.Array:
    """Per row: the layer's fingerprint (its ``settings``, the row's fingerprint ``rows``, the
    values of ``columns``), or null for every row when the stage has no layer (``settings`` None)."""
    import pyarrow as pa

    if settings is None:
        return pa.nulls(len(rows), pa.string())
    layer_fp = digest(json.dumps({"layer": stage.dirname(), **settings}, sort_keys=True, default=str))
    with_rows = table.append_column("__row_fp", rows) if "__row_fp" not in table.column_names else table
    return value_fingerprints(layer_fp, with_rows, [*columns, "__row_fp"])


def content_fingerprints(table: pa.Table, columns: list[str]) -> pa.Array:
    """Per row, the fingerprint of root rows (the clip table) from the content of ``columns``
    (strings, integers, and lists of them), joined column-wise by Arrow, hashed per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for name in columns:
        col = table[name].combine_chunks()
        if pa.types.is_list(col.type):
            col = pc.binary_join(col.cast(pa.list_(pa.string())), "\x1f")
        parts.append(col.cast(pa.string()).fill_null(""))
    text = pc.binary_join_element_wise(*parts, "\x1e")
    return pa.array([digest(t) for t in text.to_pylist()], pa.string())
