"""The Table-1-style modality-robustness report and the modality-bias index.

Given one prediction set per condition (see :mod:`evalkit.perturb`), the report gives the seven
metrics per condition, each condition's relative drop against ``clean``,
``drop = (clean - condition) / clean``, and the modality-bias index

    bias = (drop_audio - drop_visual) / (drop_audio + drop_visual)

where ``drop_audio`` is the mean drop over the audio conditions present (``audio_*``: silent,
Gaussian, shuffled) and ``drop_visual`` the mean over the visual ones (``visual_*``: black, white,
noise, shuffled), each drop first floored at 0 (a perturbation that helps shows no reliance). The
index lies in [-1, 1]: +1 when only audio perturbations hurt (the model ignores the picture), -1
when only visual ones do, 0 when both hurt equally. It is computed on SPIDEr, or on CIDEr-D when
SPICE is unavailable; the report says which. It is undefined (``null``, with the reason) when no
perturbation hurts. The same formula is also given per perturbation kind: ``missing``
(audio_silent vs the mean of visual_black and visual_white), ``noise`` (audio_gaussian vs
visual_noise) and ``shuffled`` (audio_shuffled vs visual_shuffled).

On the paper's Table 1 (LAVCap trained on AudioCaps, CIDEr) the index is 0.59; on its Table 4
(trained on AudioVisualCaps) -0.10.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evalkit.metrics import METRICS, Scores
from evalkit.report import fmt, markdown_table
from pipeline.errors import AbortRun
from pipeline.io import atomic_path, atomic_write_text

LABELS = {  # condition -> (audio, visual) as the paper's tables name them
    "clean": ("Original", "Original"),
    "visual_black": ("Original", "Black"),
    "visual_white": ("Original", "White"),
    "visual_noise": ("Original", "Noise image"),
    "audio_silent": ("Silent", "Original"),
    "audio_gaussian": ("Gaussian", "Original"),
    "visual_shuffled": ("Original", "Shuffled visual"),
    "audio_shuffled": ("Shuffled audio", "Original"),
}
KINDS = {
    "missing": (("audio_silent",), ("visual_black", "visual_white")),
    "noise": (("audio_gaussian",), ("visual_noise",)),
    "shuffled": (("audio_shuffled",), ("visual_shuffled",)),
}


def relative_drop(clean: float | None, value: float | None) -> float | None:
    if clean is None or value is None or clean <= 0:
        return None
    return (clean - value) / clean


def bias_index(audio_drops: list[float], visual_drops: list[float]) -> tuple[float | None, str | None]:
    """(index, None) or (None, reason); drops floored at 0, averaged per side."""
    if not audio_drops or not visual_drops:
        return None, "needs at least one audio and one visual condition"
    da = sum(max(d, 0.0) for d in audio_drops) / len(audio_drops)
    dv = sum(max(d, 0.0) for d in visual_drops) / len(visual_drops)
    if da + dv <= 0:
        return None, "no perturbation lowers the score"
    return (da - dv) / (da + dv), None


def build_report(scores: Mapping[str, Scores]) -> dict[str, Any]:
    """The report as a JSON-ready dict: scores, drops, bias index (see the module docstring)."""
    if "clean" not in scores:
        raise AbortRun("the robustness report needs predictions for the 'clean' condition")
    clean = scores["clean"].values
    conditions = list(scores)
    drops = {
        c: {m: relative_drop(clean[m], scores[c].values[m]) for m in METRICS}
        for c in conditions
        if c != "clean"
    }
    key = "SPIDEr" if all(s.values["SPIDEr"] is not None for s in scores.values()) else "CIDEr-D"
    side = {
        "audio": [c for c in drops if c.startswith("audio_")],
        "visual": [c for c in drops if c.startswith("visual_")],
    }

    def side_drops(names: tuple[str, ...] | list[str]) -> list[float]:
        return [d for c in names if c in drops and (d := drops[c][key]) is not None]

    index, reason = bias_index(side_drops(side["audio"]), side_drops(side["visual"]))
    per_kind = {}
    for kind, (a, v) in KINDS.items():
        if any(c in drops for c in a) and any(c in drops for c in v):
            k_index, k_reason = bias_index(side_drops(a), side_drops(v))
            per_kind[kind] = {"index": k_index, "reason": k_reason}
    unavailable = {m: why for s in scores.values() for m, why in s.unavailable.items()}
    return {
        "metrics": list(METRICS),
        "conditions": {
            c: {"label": LABELS.get(c, (c, "")), **scores[c].to_dict(), "drop": drops.get(c)}
            for c in conditions
        },
        "bias": {
            "metric": key,
            "why_metric": None if key == "SPIDEr" else f"SPICE unavailable: {unavailable.get('SPICE', '')}",
            "audio_conditions": side["audio"],
            "visual_conditions": side["visual"],
            "drop_audio": _mean(side_drops(side["audio"])),
            "drop_visual": _mean(side_drops(side["visual"])),
            "index": index,
            "reason": reason,
            "per_kind": per_kind,
        },
    }


def _mean(values: list[float]) -> float | None:
    return sum(max(v, 0.0) for v in values) / len(values) if values else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def report_markdown(report: dict[str, Any]) -> str:
    conds = report["conditions"]
    header = ["Audio", "Visual", *METRICS]
    scores = [[*v["label"], *(fmt(v["metrics"][m]) for m in METRICS)] for v in conds.values()]
    drops = [[*v["label"], *(_pct(v["drop"][m]) for m in METRICS)] for c, v in conds.items() if c != "clean"]
    b = report["bias"]
    lines = ["# Modality robustness", "", "## Scores", "", markdown_table(header, scores)]
    lines += ["## Relative drop against clean", "", "(clean - condition) / clean; positive = worse.", ""]
    lines += [markdown_table(header, drops)]
    lines += ["## Modality-bias index", ""]
    lines += [
        f"On **{b['metric']}**" + (f" ({b['why_metric']})" if b["why_metric"] else "") + ": "
        f"drop_audio = {fmt(b['drop_audio'])}, drop_visual = {fmt(b['drop_visual'])}, "
        f"**bias = {fmt(b['index'])}**" + (f" ({b['reason']})" if b["reason"] else "") + ".",
        "",
        "bias = (drop_audio - drop_visual) / (drop_audio + drop_visual), drops floored at 0 and averaged "
        "per side: +1 = only audio perturbations hurt (audio-biased), -1 = only visual ones, 0 = balanced.",
        "",
    ]
    for kind, v in b["per_kind"].items():
        lines.append(f"- {kind}: {fmt(v['index'])}" + (f" ({v['reason']})" if v["reason"] else ""))
    counts = {c: v["counts"] for c, v in conds.items()}
    lines += ["", "Clips per condition: " + ", ".join(f"{c} {n['matched']}" for c, n in counts.items())]
    notes = {m: why for v in conds.values() for m, why in v["unavailable"].items()}
    lines += [f"\n{m} unavailable: {why}" for m, why in notes.items()]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], dest: Path) -> None:
    """A PNG: the bias metric per condition, and each condition's relative drop, audio vs visual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = report["bias"]["metric"]
    conds = report["conditions"]
    names = list(conds)
    colors = [
        "#777777" if c == "clean" else "#d95f02" if c.startswith("audio_") else "#1b9e77" for c in names
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    values = [conds[c]["metrics"][key] or 0.0 for c in names]
    ax1.bar(range(len(names)), values, color=colors)
    ax1.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax1.set_ylabel(key)
    ax1.set_title(f"{key} per condition")
    perturbed = [c for c in names if c != "clean"]
    drops = [100 * (conds[c]["drop"][key] or 0.0) for c in perturbed]
    ax2.bar(range(len(perturbed)), drops, color=colors[1:] if names[0] == "clean" else colors)
    ax2.set_xticks(range(len(perturbed)), perturbed, rotation=35, ha="right")
    ax2.set_ylabel(f"relative drop of {key} vs clean (%)")
    ax2.axhline(0, color="black", linewidth=0.8)
    b = report["bias"]
    ax2.set_title(f"modality-bias index = {fmt(b['index'], 2)} (+1 audio-biased, -1 visual-biased)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Patch(color="#d95f02", label="audio perturbed"),
        Patch(color="#1b9e77", label="visual perturbed"),
    ]
    for side, color in (("audio", "#d95f02"), ("visual", "#1b9e77")):
        if b[f"drop_{side}"] is not None:
            ax2.axhline(100 * b[f"drop_{side}"], color=color, linestyle="--", linewidth=1)
            handles.append(Line2D([], [], color=color, linestyle="--", label=f"mean {side} drop"))
    # Head room above the tallest bar for the legend.
    ax2.set_ylim(min([0.0, *drops]) * 1.1, max([1.0, *drops]) * 1.4)
    ax2.legend(handles=handles, loc="upper left")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """``robustness.md``, ``robustness.json`` and ``robustness.png`` in ``out``."""
    paths = {
        "markdown": out / "robustness.md",
        "json": out / "robustness.json",
        "png": out / "robustness.png",
    }
    atomic_write_text(paths["markdown"], report_markdown(report))
    atomic_write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    plot(report, paths["png"])
    return paths
