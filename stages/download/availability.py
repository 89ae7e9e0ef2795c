"""Stage 1's availability report: per split, how many clips were downloaded, which failed for
good and why, set against what public AudioCaps downloaders reported as gone from YouTube; and
where the downloaded clips came from (clips per source of picture and sound)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun
from pipeline.selection import eligible_frame

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.stage import ItemStage


# What public AudioCaps downloaders reported as no longer downloadable from YouTube (2023-2024),
# in percent of a split's clips (FACTS.md). A run far above them has a problem of its own.
PUBLIC_GONE_PCT: dict[str, tuple[float, float]] = {"train": (7.0, 9.0), "test": (3.0, 9.0)}
# Permanent failures that mean the video cannot be had from the source (what those figures count);
# the other permanent reasons (no_audio, corrupt_source, too_short ...) are clips gone unusable.
GONE_REASONS = frozenset(
    {
        "private",
        "removed",
        "account_terminated",
        "copyright",
        "unavailable",
        "age_restricted",
        "members_only",
        "geo_blocked",
        "http_404",
        "http_410",
    }
)
# Fewer settled clips than this in a split: no verdict (a few clips say nothing about a rate).
MIN_SETTLED = 100
# Points above the public range that count as far off.
FAR_OFF_POINTS = 3.0


def compare_with_public(split: str, ok: int, permanent: dict[str, int], transient: int) -> dict[str, Any]:
    """How a split's share of gone clips compares with the public figures: ``gone``, ``gone_pct``
    (of the settled clips: ok or failed for good), ``public_gone_pct``, ``vs_public`` (within,
    above, far_above, below, too_few, no_public_figure) and a one-line ``note`` when worth saying."""
    gone = sum(n for reason, n in permanent.items() if reason in GONE_REASONS)
    settled = ok + sum(permanent.values())
    pct = round(100.0 * gone / settled, 2) if settled else None
    public = PUBLIC_GONE_PCT.get(split)
    out: dict[str, Any] = {"gone": gone, "gone_pct": pct, "public_gone_pct": list(public) if public else None}
    if public is None:
        out["vs_public"] = "no_public_figure"
    elif settled < MIN_SETTLED or pct is None:
        out["vs_public"] = "too_few"
    else:
        lo, hi = public
        if pct > hi:
            out["vs_public"] = "far_above" if pct > hi + FAR_OFF_POINTS else "above"
        else:
            out["vs_public"] = "below" if pct < lo else "within"
    figure = f"public downloaders: {public[0]:g}-{public[1]:g}%" if public else "no public figure"
    head = f"{split}: {pct}% of {settled} settled clips gone from the source ({figure})"
    if out["vs_public"] == "far_above":
        out["note"] = (
            f"{head}: far above; a broken extractor or a throttled address looks like missing videos: "
            "check the reasons, `yt-dlp -v` (JS runtime), cookies, and retry with --retry-failed"
        )
    elif out["vs_public"] in ("within", "above", "below"):
        out["note"] = f"{head}: {out['vs_public'].replace('_', ' ')}"
    if transient and settled and transient > 0.05 * (settled + transient):
        extra = f"{split}: {transient} clips still failing transiently (rate limits? rerun later)"
        out["note"] = f"{out['note']}; {extra}" if out.get("note") else extra
    return out


def availability_report(stage: ItemStage, state: pd.DataFrame) -> dict[str, Any]:
    try:
        eligible = eligible_frame(stage, stage.ctx, ["split"])
    except AbortRun:
        return {}
    report: dict[str, Any] = {}
    splits = eligible["split"] if "split" in eligible.columns else None
    groups = eligible.groupby(splits) if splits is not None else [("all", eligible)]
    for split, group in groups:
        cur = state.reindex(group.index)
        status = cur["status"].astype(object).fillna("pending")
        n = len(group)
        ok = int((status == "ok").sum())
        perm = cur[status == "failed_permanent"]["reason"].value_counts().sort_index()
        trans = cur[status == "failed_transient"]["reason"].value_counts().sort_index()
        permanent = {str(k): int(v) for k, v in perm.items()}
        transient = {str(k): int(v) for k, v in trans.items()}
        report[str(split)] = {
            "clips": n,
            "downloaded": ok,
            "available_pct": round(100.0 * ok / n, 2) if n else None,
            "permanent": permanent,
            "transient": transient,
            "pending": int((status == "pending").sum()),
            **compare_with_public(str(split), ok, permanent, sum(transient.values())),
            **source_counts(cur[status == "ok"]),
        }
    return {"availability": report}


def source_counts(ok: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Clips per source of their picture (``sources``) and of their sound (``audio_sources``).
    Rows from before sources existed name none: they came from YouTube (they have a URL)."""
    if ok.empty:
        return {"sources": {}, "audio_sources": {}}
    fallback = ok["source_url"].astype(object).where(ok["source_url"].isna(), "youtube:youtube")
    fallback = fallback.fillna("unknown")
    out = {}
    for key, col in (("sources", "video_source"), ("audio_sources", "audio_source")):
        values = ok[col].astype(object) if col in ok.columns else fallback
        values = values.where(values.notna(), fallback)
        out[key] = {str(k): int(v) for k, v in values.value_counts().sort_index().items()}
    return out


def sources_note(availability: dict[str, Any]) -> str | None:
    """One status line: clips per source over every split (said when a local source gave any)."""
    total: dict[str, int] = {}
    sound: dict[str, int] = {}
    for split in availability.values():
        for name, n in split.get("sources", {}).items():
            total[name] = total.get(name, 0) + n
        for name, n in split.get("audio_sources", {}).items():
            sound[name] = sound.get(name, 0) + n
    if not total or (set(total) == {"youtube:youtube"} and set(sound) <= {"youtube:youtube"}):
        return None
    line = "clips per source: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
    if sound != total:
        line += "; sound: " + ", ".join(f"{k} {v}" for k, v in sorted(sound.items()))
    return line
