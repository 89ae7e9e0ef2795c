"""``avcaps sources``: what each of stage 1's sources holds of the clip table, before a long run.

Per source, in order: how many clips of the clip table it holds (per split), a few sample
matches, the clips it holds more than once (``ambiguous_source`` in a run) and the names it
refuses; and how many clips are left for YouTube. Writes nothing: an index that is missing or out
of date is built in memory and dropped (the run builds and keeps it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.cli import config_options, load_context

if TYPE_CHECKING:
    from stages.download.index import SourceIndex


@click.command("sources")
@config_options
@click.option(
    "--examples", type=click.IntRange(min=0), default=3, show_default=True, help="Matches shown per source."
)
def sources(config_path: Path, workdir: Path | None, overrides: tuple[str, ...], examples: int) -> None:
    """Show what each of stage 1's sources (download.sources) holds of the clip table."""
    for line in describe(load_context(config_path, workdir, overrides), examples):
        click.echo(line)


def describe(ctx: Any, examples: int = 3) -> list[str]:
    import pyarrow.compute as pc

    from pipeline.errors import AbortRun
    from pipeline.selection import stage_ledger
    from stages.download.index import open_index, wanted_keys
    from stages.download.sources import YoutubeSource, check_sources, source_pattern
    from stages.download.stage import DownloadStage
    from stages.manifest import ManifestStage

    ledger = stage_ledger(ManifestStage, ctx.workdir)
    if not ledger.exists():
        raise AbortRun(f"no clip table in {ctx.workdir}: run `avcaps run 0` first")
    cols = ["status", "youtube_id", "start_s", "end_s", "split", "audiocap_ids"]
    table = ledger.latest_table(cols)
    table = table.filter(pc.equal(table["status"], "ok"))
    clips = table.to_pylist()
    cfg = ctx.config.download
    srcs: list[Any] = list(cfg.sources) or [YoutubeSource(kind="youtube")]
    check_sources(srcs)
    folder = ctx.workdir / DownloadStage.dirname() / "sources"
    head = f"{len(clips)} clips in the clip table of {ctx.workdir}"
    lines = [f"{head}; {len(srcs)} source(s), the first with a valid copy wins:"]
    left = {c["clip_id"] for c in clips}  # clips no source so far holds (a picture for)
    for i, src in enumerate(srcs):
        head = f"[{i}] {src.label}"
        if src.kind == "youtube":
            template = src.url_template or cfg.url_template
            lines.append(f"{head}: {template}: the {len(left)} clip(s) no earlier source holds")
            left = set()
            continue
        what = f"download.sources[{i}] ({src.label})"
        holds = source_pattern(src, what).holds
        index = open_index(folder, src, what, save=False, wanted=wanted_keys(holds, table))
        lines += _index_lines(head, src, index)
        lines += _held_lines(src, index, clips, left, examples)
    if left:
        lines.append(f"no source for {len(left)} clip(s) (a run fails them not_in_sources)")
    return lines


def _index_lines(head: str, src: Any, index: SourceIndex) -> list[str]:
    """The source: where it is, what it holds (pre-cut or full-length; which streams), and its
    index's figures (names, matches, names the pattern does not match)."""
    fig = index.meta
    if index.rebuilt is None:
        state = f"index of {fig['built_at']} (current)"
    else:
        state = f"index built now ({index.rebuilt}; not saved: the run keeps it)"
    where = getattr(src, "path", None) or getattr(src, "dataset", "")
    kind = "pre-cut clips" if index.pattern.precut else "full-length media, cut here"
    stream = {"both": "picture and sound", "video": "picture only", "audio": "sound only"}[src.streams]
    unmatched = ""
    if fig["unmatched"]:
        unmatched = f", {fig['unmatched']} do not (e.g. {', '.join(fig['examples'][:3])})"
    return [
        f"{head}: {where} ({kind}; {stream})",
        f"    {state}: {fig['names']} name(s), {fig['matched']} match the pattern{unmatched}",
    ]


def _held_lines(
    src: Any, index: SourceIndex, clips: list[dict[str, Any]], left: set[str], examples: int
) -> list[str]:
    """What the source holds of the clip table: clips per split, a few matches, the clips it
    holds more than once and the names it refuses. A clip it gives the picture of leaves ``left``."""
    from stages.download.sources import clip_keys

    fig = index.meta
    lines: list[str] = []
    held: Counter[str] = Counter()
    shown: list[str] = []
    ambiguous: list[str] = []
    refused: list[str] = []
    for clip in clips:
        rows = index.rows(clip_keys(index.pattern.holds, clip, clip["clip_id"]))
        usable = [r for r in rows if not r["refused"]]
        if len(usable) > 1:
            ambiguous.append(f"{clip['clip_id']}: {', '.join(r['name'] for r in usable)}")
        elif usable:
            held[str(clip["split"])] += 1
            if src.streams != "audio":
                left.discard(clip["clip_id"])
            if len(shown) < examples:
                shown.append(f"{usable[0]['name']} -> {clip['clip_id']}")
        elif rows:
            refused.append(f"{rows[0]['name']}: {rows[0]['refused']}")
    total = sum(held.values())
    pct = f" ({100 * total / len(clips):.1f}%)" if clips else ""
    splits = ", ".join(f"{k} {v}" for k, v in sorted(held.items()))
    lines.append(f"    holds {total} of {len(clips)} clips{pct}" + (f": {splits}" if splits else ""))
    lines += [f"    e.g. {s}" for s in shown]
    if ambiguous:
        lines.append(f"    ambiguous (a run fails them ambiguous_source): {len(ambiguous)}")
        lines += [f"      {a}" for a in ambiguous[:examples]]
    extra = [r for r in fig.get("refused", []) if r not in refused]
    if refused or fig.get("refused_count"):
        lines.append(f"    refused: {max(len(refused), fig.get('refused_count', 0))} name(s)")
        lines += [f"      {r}" for r in (refused + extra)[: max(examples, 1)]]
    return lines
