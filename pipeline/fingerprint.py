"""Fingerprints: every ledger row knows what it was made from.

A row's ``fingerprint`` is a short hash of the stage's settings that change its output (what the
stage's ``fingerprint_settings()`` declares: model and revision, prompt hash, decoding
parameters...) and of the fingerprint of the upstream row it was made from, so it covers the whole
chain back to the clip table (whose rows are fingerprinted by their content).

An item is **current** at a stage when its row's fingerprint equals the one a run would give it now:
the chain recomputed from the clip table with today's settings of every stage. Otherwise it is
**stale**: ``avcaps status`` counts it, a plain ``avcaps run`` redoes it, and no later stage takes
it as input until it is redone. Rows written before fingerprints existed (null) are taken as
current: nothing says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.stage import Stage

_DIGEST = 8  # bytes: 16 hex characters, plenty to tell settings and inputs apart


def digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_DIGEST).hexdigest()


def settings_fingerprint(stage: Stage, settings: dict[str, Any] | None = None) -> str:
    """The stage's name and the settings it declares, hashed (keys sorted, JSON); ``settings``:
    others than it declares now (what an earlier version of the stage declared, to recognise the
    rows it made)."""
    settings = stage.fingerprint_settings() if settings is None else settings
    return digest(json.dumps({"stage": stage.dirname(), **settings}, sort_keys=True, default=str))


def chain(settings_fp: str, upstream: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Per item: the fingerprint of a row made with ``settings_fp`` from an upstream row whose
    fingerprint is ``upstream`` (null upstream: an empty string, so legacy rows chain too)."""
    import pyarrow as pa

    prefix = settings_fp + "|"
    return pa.array([digest(prefix + (u or "")) for u in upstream.to_pylist()], pa.string())


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
