"""Risk-ordered review: which merges annotators see first, and the scores a task shows.

Stage 4 scores every merged caption with CLAP (audio <-> text) and CLIP (keyframe <-> text), and
the captions it merged from (the column contract is ``stages/scores.py``; stage 5 reads the
columns by name, as it reads every upstream column). Raw cosines are not comparable across
models, so each is ranked as a **percentile over the population**: every clip stage 5 applies to
in this run (current merges of the review splits), per column, lists flattened (one value per
caption). Percentiles are taken when a push runs: a task keeps the figures of its push.

The **risk** of a clip is the lower of the CLAP and CLIP percentiles of each of its merged
captions, and the lowest over its captions: 0-100, low = the merge matches its audio or its
picture worst, so it is reviewed first. One score missing, the other decides; a clip without any
merge score has no risk and is pushed after every scored clip (in clip-table order, as before
scoring existed): unscored clips are not known to be risky, and a run with scoring off keeps the
order it always had.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pipeline.ranks import cell_percentiles
from stages.scores import (
    MERGE_CLAP,
    MERGE_CLIP,
    MERGE_SCORES,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
)

if TYPE_CHECKING:
    import pyarrow as pa

#: Stage 4's score columns that a task shows (raw and percentile).
SCORE_COLUMNS = MERGE_SCORES
#: Task data keys that only help the annotator (scores): refreshing them is no new task to review.
DISPLAY_KEYS: frozenset[str] = frozenset({"risk", "scores", "scores_text"})


def _num(x: Any) -> float | None:
    if x is None:
        return None
    f = float(x)
    return None if math.isnan(f) else f


def clip_risk(clap_pct: Any, clip_pct: Any) -> float | None:
    """min over the merged captions of min(CLAP percentile, CLIP percentile); None if unscored."""
    clap, clip = list(clap_pct or []), list(clip_pct or [])
    worst: float | None = None
    for k in range(max(len(clap), len(clip))):
        for pct in (clap[k] if k < len(clap) else None, clip[k] if k < len(clip) else None):
            p = _num(pct)
            if p is not None and (worst is None or p < worst):
                worst = p
    return worst


class RunScores:
    """Percentiles of every score column over a population of clips (a table with ``clip_id``
    and the score columns it has), and each clip's risk."""

    def __init__(self, table: pa.Table) -> None:
        self.ids: list[str] = table["clip_id"].to_pylist()
        self.raw: dict[str, list[Any]] = {}
        self.pct: dict[str, list[Any]] = {}
        for col in SCORE_COLUMNS:
            if col in table.column_names:
                self.raw[col] = table[col].to_pylist()
                self.pct[col] = cell_percentiles(self.raw[col])
        self.row = {cid: i for i, cid in enumerate(self.ids)}
        clap, clip = self.pct.get(MERGE_CLAP), self.pct.get(MERGE_CLIP)
        self.risks: list[float | None] = [
            clip_risk(clap[i] if clap else None, clip[i] if clip else None) for i in range(len(self.ids))
        ]

    def __len__(self) -> int:
        return len(self.ids)

    def order(self) -> list[int]:
        """Row indices, riskiest first; unscored clips last; ties and unscored in table order."""
        return sorted(
            range(len(self.ids)),
            key=lambda i: (self.risks[i] is None, self.risks[i] if self.risks[i] is not None else 0.0, i),
        )

    def task_fields(self, clip_id: str, n_audio: int, n_merged: int) -> dict[str, Any]:
        """The task data keys of :data:`DISPLAY_KEYS` for one clip (``risk`` None: unscored)."""
        i = self.row.get(clip_id)
        scores: dict[str, Any] = {}
        if i is not None:
            for col in self.raw:
                if self.raw[col][i] is None:
                    continue  # unscored: no key (scoring off, or a row from before it existed)
                scores[col] = _rounded(self.raw[col][i], 4)
                scores[col.replace("_score", "_percentile")] = _rounded(self.pct[col][i], 1)
        raw = None if i is None else self.risks[i]
        risk = None if raw is None else round(float(raw), 1)
        return {
            "risk": risk,
            "scores": scores,
            "scores_text": scores_text(scores, risk, n_audio, n_merged, len(self)),
        }


def _rounded(value: Any, digits: int) -> Any:
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    v = _num(value)
    return None if v is None else round(v, digits)


def _pair(scores: dict[str, Any], column: str, k: int | None) -> str:
    raw = scores.get(column)
    pct = scores.get(column.replace("_score", "_percentile"))
    if k is not None:
        raw = raw[k] if isinstance(raw, list) and k < len(raw) else None
        pct = pct[k] if isinstance(pct, list) and k < len(pct) else None
    if raw is None:
        return "n/a"
    return f"{raw:.3f} (p{pct:.0f})" if pct is not None else f"{raw:.3f}"


def scores_text(
    scores: dict[str, Any], risk: float | None, n_audio: int, n_merged: int, population: int
) -> str:
    """What the annotator reads under the captions: raw scores with their run percentiles."""
    if not any(v is not None and v != [] for k, v in scores.items() if k.endswith("_score")):
        return "No CLAP/CLIP scores for this clip (scoring was off when it was merged)."
    lines = [
        f"Risk {risk:.0f} of 100: the lowest CLAP or CLIP percentile of its merged captions "
        "(low = the merge matches the sound or the picture worst; such tasks come first)."
        if risk is not None
        else "Risk: n/a (its merged captions have no score)."
    ]
    for k in range(n_merged):
        label = f"Merged caption {k + 1}" if n_merged > 1 else "Merged caption"
        lines.append(f"{label}: CLAP {_pair(scores, MERGE_CLAP, k)}, CLIP {_pair(scores, MERGE_CLIP, k)}")
    for k in range(n_audio):
        label = f"Audio caption {k + 1}" if n_audio > 1 else "Audio caption"
        lines.append(
            f"{label}: CLAP {_pair(scores, SOURCE_AUDIO_CLAP, k)}, CLIP {_pair(scores, SOURCE_AUDIO_CLIP, k)}"
        )
    lines.append(
        f"Visual caption: CLAP {_pair(scores, SOURCE_VISUAL_CLAP, None)}, "
        f"CLIP {_pair(scores, SOURCE_VISUAL_CLIP, None)}"
    )
    lines.append(
        f"CLAP: audio <-> text, CLIP: keyframe <-> text (cosine); pNN = percentile among the "
        f"{population} clips of this run's review when pushed (p100 = best)."
    )
    return "\n".join(lines)
