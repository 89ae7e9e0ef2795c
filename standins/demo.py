"""``make demo``: the whole pipeline, offline, on the demo manifest.

The demo prepares a local stand-in for each external thing a stage needs (generated media on an
HTTP server on 127.0.0.1 for yt-dlp, tiny random-weight models built from the real classes, a local
Label Studio) and runs every registered stage in order through the same runner as ``avcaps run``.
The models are built where the config names them (``manifests/demo.yaml``: under the run folder),
so that file describes the demo folder afterwards (``avcaps status --config manifests/demo.yaml``);
only what exists while the demo runs (the media server's and Label Studio's ports) is passed as
overrides. Then it runs the evaluation kit on the run
(:func:`show_evaluation`). Its captions are meaningless: it shows the pipeline working end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import AbortRun
from pipeline.stage import RunContext, RunOptions

# A prepare hook gets (exit stack, the run's context so far) and returns config overrides
# ("key=value") for what exists only while the demo runs.
Prepare = Callable[[contextlib.ExitStack, RunContext], list[str]]
PREPARE: dict[str, Prepare] = {}


def prepare(stage_name: str) -> Callable[[Prepare], Prepare]:
    def register(fn: Prepare) -> Prepare:
        PREPARE[stage_name] = fn
        return fn

    return register


@prepare("merge")
def prepare_merge(stack: contextlib.ExitStack, ctx: RunContext) -> list[str]:
    """Stage 4 in-process (backend transformers, named in manifests/demo.yaml) on the tiny random
    chat model, built once where ``merge.model`` names it. The gate's relaxed thresholds for its
    word salad are in manifests/demo.yaml."""
    from standins.llm import build_tiny_chat_model

    build_tiny_chat_model(_local(ctx.config.merge.model, "merge.model"))  # type: ignore[attr-defined]
    return []


def _local(model: str | None, key: str) -> Path:
    """The folder the config names for a model: where the demo builds its stand-in (a path
    relative to the current folder, as every path of a config is)."""
    if not model:
        raise AbortRun(f"the demo builds a stand-in model where {key} names it; it names none")
    return Path(model)


# The demo's Label Studio login when LABEL_STUDIO_USERNAME/PASSWORD/API_KEY are not set: public,
# documented, for a server that listens on 127.0.0.1 only and serves the demo's stand-in media.
DEMO_LOGIN = ("demo@avcaps.local", "avcaps-demo-only", "de305d5475b4431badb2eb6b9e546014de305d54")


@prepare("review")
def review_server(stack: contextlib.ExitStack, ctx: RunContext) -> list[str]:
    """Start a local Label Studio for the demo run (stopped at exit); stage 5 pushes to it and the
    export pulls from it. Nobody reviews in a demo, so the pull finds no annotations and the export
    runs with ``export.allow_unreviewed=true`` (raw merges flagged "unreviewed")."""
    import os

    from stages.review.server import (
        API_KEY_ENV,
        Credentials,
        LabelStudioServer,
        credentials_from_env,
        free_port,
    )

    names = ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", API_KEY_ENV)
    if all(os.environ.get(n) for n in names):
        creds = credentials_from_env()
    else:
        creds = Credentials(*DEMO_LOGIN)
        os.environ[API_KEY_ENV] = creds.api_key  # for the stage's client, in this process only
    root = ctx.workdir.resolve()
    server = LabelStudioServer(
        Path(".venv-labelstudio"), root / "05-review" / "label-studio", root, creds, port=free_port()
    )
    print(f"demo: starting Label Studio on {server.url} (first start migrates, ~1 min)", flush=True)
    server.start()
    stack.callback(server.stop)
    print(f"demo: Label Studio is up at {server.url}; log in as {creds.username}", flush=True)
    # Nobody reviews in a demo: the export includes the raw merges, flagged "unreviewed".
    return [f"review.url={server.url}", f"review.document_root={root}", "export.allow_unreviewed=true"]


@prepare("caption")
def prepare_caption(stack: contextlib.ExitStack, ctx: RunContext) -> list[str]:
    """A tiny random BLIP-2, CLIP and CLAP, built once where ``caption.model`` and the
    ``scoring`` section name them, loaded by path like real ones (CLIP scores stage 3's captions;
    CLIP and CLAP score stage 4's merges)."""
    from standins.blip2 import build_tiny_blip2
    from standins.scorers import build_tiny_clap, build_tiny_clip

    cfg = ctx.config
    build_tiny_blip2(_local(cfg.caption.model, "caption.model"))  # type: ignore[attr-defined]
    scoring = cfg.scoring  # type: ignore[attr-defined]
    if scoring.clip_model:
        build_tiny_clip(_local(scoring.clip_model, "scoring.clip_model"))
    if scoring.clap_model:
        build_tiny_clap(_local(scoring.clap_model, "scoring.clap_model"))
    return []


@prepare("download")
def serve_demo_media(stack: contextlib.ExitStack, ctx: RunContext) -> list[str]:
    """Stage 1 takes half the demo clips from a local folder of full-length videos named as
    AudioSet copies are (``lab-media/Y<id>.mp4``, cut here in-process) and the other half from a
    stand-in YouTube: generated videos served on 127.0.0.1 for yt-dlp."""
    import json

    import pandas as pd

    from standins.media import MediaServer, make_sources

    workdir = ctx.workdir
    clips = pd.read_parquet(workdir / "00-manifest" / "ledger", columns=["youtube_id", "start_s"])
    pairs = sorted((str(r.youtube_id), int(r.start_s)) for r in clips.itertuples())
    lab = workdir / "lab-media"
    make_sources(lab, pairs[::2], name="Y{youtube_id}.mp4")
    root = workdir / "standin-media"
    make_sources(root, pairs[1::2])
    server = stack.enter_context(MediaServer(root))
    sources = [
        {"kind": "folder", "name": "lab", "path": str(lab), "pattern": "Y{youtube_id}.mp4"},
        {"kind": "youtube", "url_template": server.url_template()},
    ]
    return [f"download.sources={json.dumps(sources)}"]


# The conditions the demo's baseline can answer: it captions the audio track it is given by
# looking it up, so silent and Gaussian-noise audio (tracks it has never seen) are left out.
EVAL_CONDITIONS = (
    "clean",
    "visual_black",
    "visual_white",
    "visual_noise",
    "visual_shuffled",
    "audio_shuffled",
)


def audio_caption_baseline(manifest: Path, captions: dict[str, str]) -> dict[str, str]:
    """A stand-in audio-only captioner for the demo's evaluation: for each input of a condition
    manifest (``avcaps perturb``), the AudioCaps caption of the clip its audio track comes from
    (``audio_source``). It never looks at the picture, as a model trained on AudioCaps learns not
    to, so only the audio perturbations move its scores."""
    from evalkit.perturb import read_condition_manifest

    return {r["clip_id"]: captions[r["audio_source"]] for r in read_condition_manifest(manifest)}


def avcaps(args: list[str], log: Path) -> None:
    """``avcaps ARGS`` in this process (one METEOR process for every score), output to ``log``."""
    from pipeline.cli import main as cli

    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ avcaps {' '.join(args)}", flush=True)
    with log.open("w") as out, contextlib.redirect_stdout(out):
        try:
            cli.main(args, prog_name="avcaps", standalone_mode=False)
        except SystemExit as exc:  # AbortRun: the one-line error is on stderr already
            if exc.code:
                raise AbortRun(f"avcaps {args[0]} failed (exit {exc.code}); see {log}") from None


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def show_evaluation(workdir: Path) -> Path:
    """The evaluation kit on the demo run, through the real ``avcaps`` commands: ``perturb`` on its
    test clips; ``eval`` of the audio-caption baseline against the run's AudioVisualCaps test
    references; ``robustness`` of the same baseline over the conditions, against the clips' other
    four AudioCaps captions (real references, so the bias index means something). Prints a table;
    returns the plot's path."""
    import json

    from pipeline.selection import stage_ledger
    from stages.manifest import ManifestStage

    root = workdir.resolve()
    out = root / "eval"
    clips = stage_ledger(ManifestStage, root).latest()
    captions = {str(cid): [str(c) for c in caps] for cid, caps in clips["audio_captions"].items()}
    first = {cid: caps[0] for cid, caps in captions.items()}
    (out / "preds").mkdir(parents=True, exist_ok=True)
    others = [
        json.dumps({"clip_id": cid, "captions": caps[1:]}) for cid, caps in captions.items() if caps[1:]
    ]
    audiocaps_refs = out / "audiocaps-refs.jsonl"
    audiocaps_refs.write_text("\n".join(others) + "\n", encoding="utf-8")

    print("\nThe evaluation kit on this run", flush=True)
    conditions = [a for c in EVAL_CONDITIONS for a in ("--condition", c)]
    avcaps(["perturb", "--run", str(root), "--out", str(out / "inputs"), *conditions], out / "perturb.txt")
    for cond in EVAL_CONDITIONS:
        preds = audio_caption_baseline(out / "inputs" / cond / "manifest.csv", first)
        lines = [json.dumps({"clip_id": c, "caption": t}) for c, t in preds.items()]
        (out / "preds" / f"{cond}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    clean = out / "preds" / "clean.jsonl"
    avcaps(
        ["eval", str(clean), "--refs", str(root), "--format", "json", "--output", str(out / "eval.json")],
        out / "eval.txt",
    )
    report_dir = out / "robustness"
    avcaps(
        [
            "robustness",
            "--preds-dir",
            str(out / "preds"),
            "--refs",
            str(audiocaps_refs),
            "--out",
            str(report_dir),
        ],
        out / "robustness.txt",
    )

    metrics = ["BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "CIDEr-D"]

    def cells(values: dict[str, float | None]) -> list[str]:
        return ["n/a" if values[m] is None else f"{values[m]:.3f}" for m in metrics]

    print(
        "  baseline: the AudioCaps caption of the audio track each input holds (never looks at the picture)"
    )
    scores = json.loads((out / "eval.json").read_text())["metrics"]
    print(
        "  avcaps eval, references: this run's AudioVisualCaps test captions (the stand-in LLM's word salad)"
    )
    _table(["predictions", *metrics], [["baseline", *cells(scores)]])
    report = json.loads((report_dir / "robustness.json").read_text())
    bias = report["bias"]
    key = bias["metric"]
    print("  avcaps robustness, references: each clip's other four AudioCaps captions")
    rows = []
    for cond, v in report["conditions"].items():
        drop = (v["drop"] or {}).get(key)
        rows.append([cond, *cells(v["metrics"]), "-" if drop is None else f"{100 * drop:+.1f}%"])
    _table(["condition", *metrics, f"drop ({key})"], rows)
    index = "undefined" if bias["index"] is None else f"{bias['index']:+.2f}"
    print(f"  modality-bias index on {key}: {index}" + (f" ({bias['reason']})" if bias["reason"] else ""))
    plot = report_dir / "robustness.png"
    print(f"  plot: {plot}", flush=True)
    return plot


def main(argv: list[str] | None = None) -> int:
    from pipeline.cli import load_context
    from pipeline.registry import stage_classes
    from pipeline.runner import run_stage
    from pipeline.status import format_table, run_status

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("manifests/demo.yaml"))
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    ctx: RunContext = load_context(args.config, args.workdir, ())
    workdir = ctx.workdir
    overrides: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            for cls in stage_classes():
                hook = PREPARE.get(cls.name)
                if hook is not None:
                    overrides += hook(stack, ctx)
                ctx = load_context(args.config, args.workdir, tuple(overrides))
                report = run_stage(cls, ctx, RunOptions())
                print(report.line(), flush=True)
        print()
        print(format_table(run_status(ctx)))
        show_evaluation(workdir)
    except AbortRun as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    print(f"\nDemo outputs are in {workdir.resolve()}:")
    for child in sorted(workdir.iterdir()):
        print(f"  {child}")
    print("The captions are made by random-weight stand-in models: meaningless by design.")
    print(
        f"{args.config} describes this folder: try `avcaps status --config {args.config}`, or "
        f"`avcaps run 3 --force --config {args.config}` (README: Playing with the demo folder)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
