"""The card's figures: PNGs under ``figures/`` in the export, linked from ``README.md``.

- ``caption_lengths.png``: words per caption (the Table-2 tokenization) of the exported audio,
  visual and merged captions;
- ``scores.png``: the raw score distributions, one panel per score column that has values (only
  when the run has scores);
- ``availability.png``: per split, the clips exported and the clips lost, by stage 1 failure
  reason (not downloadable) and by later stage;
- ``review_verdicts.png``: the test merges' review verdicts (only when some were reviewed).

Drawn with matplotlib's Agg backend (imported here, lazily: nothing else in the pipeline needs
it), under matplotlib's default style whatever the user's matplotlibrc says, and saved without the
PNG ``Software`` field (the only metadata Agg writes; no date), so the same export gives the same
bytes with the same matplotlib version and publishing again uploads nothing new. Each file is
written atomically like every other export file (``atomic_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path
from stages.export.caption_stats import words

FOLDER = "figures"
DPI = 100
AUDIO, VISUAL, MERGED = "#d95f02", "#1b9e77", "#7570b3"
# Exported in green; the reasons a clip was lost in colours that are not (ColorBrewer Set1/Paired).
EXPORTED = "#4daf4a"
LOST = ("#e41a1c", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#999999", "#377eb8", "#fdbf6f", "#cab2d6")


@dataclass(frozen=True)
class Figure:
    path: str  # relative to the export folder, as the card links it
    title: str  # alt text and caption in the card


def _save(fig: Any, dest: Path) -> None:
    import matplotlib.pyplot as plt

    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        # metadata: drop "Software" (matplotlib's version string); Agg writes no creation time.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)


def _lengths(texts: list[str]) -> list[int]:
    return [len(words(t)) for t in texts if t]


def caption_lengths(rows: list[dict[str, Any]], merged_splits: set[str], dest: Path) -> None:
    import matplotlib.pyplot as plt

    groups = [
        ("audio (AudioCaps)", _lengths([c for r in rows for c in r["audio_captions"]]), AUDIO),
        ("visual (image captioner)", _lengths([r["visual_caption"] for r in rows]), VISUAL),
        (
            "merged (LLM, merged splits)",
            _lengths([c for r in rows if r["split"] in merged_splits for c in r["merged_captions"]]),
            MERGED,
        ),
    ]
    longest = max([1, *(max(g[1], default=0) for g in groups)])
    bins = [b - 0.5 for b in range(0, longest + 2)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharex=True)
    for ax, (label, lengths, color) in zip(axes, groups, strict=True):
        if lengths:
            ax.hist(lengths, bins=bins, color=color)
            mean = sum(lengths) / len(lengths)
            ax.axvline(mean, color="black", linestyle="--", linewidth=1)
            ax.set_title(f"{label}\n{len(lengths)} captions, mean {mean:.2f} words", fontsize=10)
        else:
            ax.set_title(f"{label}\nnone in this export", fontsize=10)
        ax.set_xlabel("words per caption")
    axes[0].set_ylabel("captions")
    fig.tight_layout()
    _save(fig, dest)


SCORE_PANELS = (
    ("visual_caption_clip_score", "visual caption: CLIP", VISUAL),
    ("merge_clap_score", "merged captions: CLAP", MERGED),
    ("merge_clip_score", "merged captions: CLIP", MERGED),
    ("source_audio_clap_score", "audio captions (merged splits): CLAP", AUDIO),
    ("source_audio_clip_score", "audio captions (merged splits): CLIP", AUDIO),
    ("source_visual_clap_score", "visual caption (merged splits): CLAP", VISUAL),
)


def score_values(rows: list[dict[str, Any]], column: str) -> list[float]:
    out: list[float] = []
    for r in rows:
        cell = r.get(column)
        cells = cell if isinstance(cell, list) else [cell]
        out += [float(v) for v in cells if v is not None]
    return out


def scores(rows: list[dict[str, Any]], dest: Path) -> bool:
    """The score histograms; False (nothing written) when no clip has a score."""
    import matplotlib.pyplot as plt

    panels = [(label, score_values(rows, col), color) for col, label, color in SCORE_PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, (label, values, color) in zip(axes.flat, panels, strict=False):
        ax.hist(values, bins=20, color=color)
        ax.set_title(f"{label}\n{len(values)} values", fontsize=10)
        ax.set_xlabel("cosine (raw)")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("captions")
    fig.tight_layout()
    _save(fig, dest)
    return True


def availability(stats: dict[str, Any], dest: Path) -> None:
    """Per split, a stacked bar: exported, then the clips lost by reason."""
    import matplotlib.pyplot as plt

    splits = list(stats["availability"])
    segments: dict[str, list[int]] = {"exported": []}
    for split in splits:
        a = stats["availability"][split]
        segments["exported"].append(int(a["exported"]))
    for i, split in enumerate(splits):
        a = stats["availability"][split]
        lost = {f"download: {k}": v for k, v in a.get("failed_download", {}).items()}
        for stage in ("keyframes", "caption", "merge"):
            n = sum(a.get(f"failed_{stage}", {}).values())
            if n:
                lost[f"{stage} failed"] = n
        review = a.get("review") or {}
        if review:
            lost["review: rejected"] = int(review.get("rejected", 0))
            lost["review: not reviewed"] = (
                sum(review.values())
                - lost["review: rejected"]
                - int(a["exported"])
                - int(a.get("media_missing", 0))
            )
        if a.get("media_missing"):
            lost["media missing"] = int(a["media_missing"])
        for label, n in lost.items():
            if n > 0:
                segments.setdefault(label, [0] * len(splits))[i] = int(n)
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.7 * len(splits) + 0.25 * len(segments)))
    left = [0] * len(splits)
    for k, (label, counts) in enumerate(segments.items()):
        color = EXPORTED if label == "exported" else LOST[(k - 1) % len(LOST)]
        ax.barh(splits, counts, left=left, color=color, label=label)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("AudioCaps clips")
    ax.set_title("Availability: exported clips and clips lost, by reason")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    _save(fig, dest)


def review_verdicts(review: dict[str, int], dest: Path) -> bool:
    """The test merges' verdicts; False (nothing written) when none was reviewed."""
    import matplotlib.pyplot as plt

    order = ("accept", "edited", "rejected", "unreviewed")
    if not sum(review.get(k, 0) for k in order[:3]):
        return False
    counts = [int(review.get(k, 0)) for k in order]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bars = ax.bar(order, counts, color=["#4daf4a", "#377eb8", "#e41a1c", "#999999"])
    ax.bar_label(bars)
    ax.set_ylabel("test clips")
    ax.set_title("Review of the test merges")
    ax.set_ylim(0, max(counts) * 1.2 + 1)
    fig.tight_layout()
    _save(fig, dest)
    return True


def write_figures(
    folder: Path, rows: list[dict[str, Any]], merged_splits: set[str], stats: dict[str, Any]
) -> list[Figure]:
    """Write the figures into ``folder/figures`` (``rows``: every exported clip once, with its
    scores); returns what was written, in the card's order."""
    try:
        import matplotlib
    except ImportError:
        raise AbortRun(
            "the card's figures need matplotlib: pip install 'matplotlib>=3.11,<3.12' (the publish "
            "extra), or export without them: --set export.figures=false"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Figure] = []
    # The default style, whatever the user's matplotlibrc says: the same data, the same pixels.
    with plt.style.context("default"):
        caption_lengths(rows, merged_splits, folder / FOLDER / "caption_lengths.png")
        out.append(Figure(f"{FOLDER}/caption_lengths.png", "Words per caption: audio, visual, merged"))
        if scores(rows, folder / FOLDER / "scores.png"):
            out.append(Figure(f"{FOLDER}/scores.png", "Score distributions (raw CLIP and CLAP cosines)"))
        availability(stats, folder / FOLDER / "availability.png")
        out.append(Figure(f"{FOLDER}/availability.png", "Availability by failure reason"))
        if review_verdicts(stats.get("review") or {}, folder / FOLDER / "review_verdicts.png"):
            out.append(Figure(f"{FOLDER}/review_verdicts.png", "Review verdicts of the test merges"))
    return out
