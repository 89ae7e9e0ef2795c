"""Formatting of scores: a terminal table, Markdown and JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from evalkit.metrics import METRICS, Scores


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"


def _notes(scores: Scores) -> list[str]:
    c = scores.counts
    notes = [
        f"clips: {c.get('matched', 0)} matched, {c.get('missing', 0)} missing, {c.get('extra', 0)} extra"
    ]
    notes += [f"{m} unavailable: {why}" for m, why in scores.unavailable.items()]
    return notes


def format_scores(scores: Scores, style: str) -> str:
    """One prediction set's scores as ``table`` (terminal), ``markdown`` or ``json``."""
    if style == "json":
        return json.dumps(scores.to_dict(), indent=2) + "\n"
    row = [[m, fmt(scores.values[m])] for m in METRICS]
    if style == "markdown":
        return markdown_table(["metric", "score"], row) + "\n" + "".join(f"- {n}\n" for n in _notes(scores))
    return text_table(["metric", "score"], row) + "".join(f"{n}\n" for n in _notes(scores))


def scores_json(scores: Mapping[str, Scores]) -> dict[str, Any]:
    return {name: s.to_dict() for name, s in scores.items()}
