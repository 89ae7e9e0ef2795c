"""``make demo``: the whole pipeline, offline, on the demo manifest.

The demo prepares a local stand-in for each external thing a stage needs (generated media on an
HTTP server on 127.0.0.1 for yt-dlp, tiny random-weight models built from the real classes, a local
Label Studio), points the config at them with overrides, and runs every registered stage in order
through the same runner as ``avcaps run``. Its captions are meaningless: it shows the pipeline
working end to end.
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

# A prepare hook gets (exit stack, run folder) and returns config overrides ("key=value").
Prepare = Callable[[contextlib.ExitStack, Path], list[str]]
PREPARE: dict[str, Prepare] = {}


def prepare(stage_name: str) -> Callable[[Prepare], Prepare]:
    def register(fn: Prepare) -> Prepare:
        PREPARE[stage_name] = fn
        return fn

    return register


@prepare("merge")
def prepare_merge(stack: contextlib.ExitStack, workdir: Path) -> list[str]:
    """Stage 4 in-process (backend transformers) on the tiny random chat model, built once under
    the run folder. The gate's relaxed thresholds for its word salad are in manifests/demo.yaml."""
    from standins.llm import build_tiny_chat_model

    model = build_tiny_chat_model(workdir / "models" / "tiny-chat")
    return [
        "merge.backend=transformers",
        f"merge.model={model}",
        "merge.device=cpu",
        "merge.reasoning_effort=null",  # a gpt-oss chat template option; the tiny model has none
    ]


# The demo's Label Studio login when LABEL_STUDIO_USERNAME/PASSWORD/API_KEY are not set: public,
# documented, for a server that listens on 127.0.0.1 only and serves the demo's stand-in media.
DEMO_LOGIN = ("demo@avcaps.local", "avcaps-demo-only", "de305d5475b4431badb2eb6b9e546014de305d54")


@prepare("review")
def review_server(stack: contextlib.ExitStack, workdir: Path) -> list[str]:
    """Start a local Label Studio for the demo run (stopped at exit); stage 5 pushes to it and the
    export pulls from it. Nobody reviews in a demo, so the pull finds no annotations and the export
    runs with ``export.allow_unreviewed=true`` (raw merges flagged "unreviewed")."""
    import os

    from review.server import API_KEY_ENV, Credentials, LabelStudioServer, credentials_from_env, free_port

    names = ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", API_KEY_ENV)
    if all(os.environ.get(n) for n in names):
        creds = credentials_from_env()
    else:
        creds = Credentials(*DEMO_LOGIN)
        os.environ[API_KEY_ENV] = creds.api_key  # for the stage's client, in this process only
    root = workdir.resolve()
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
def prepare_caption(stack: contextlib.ExitStack, workdir: Path) -> list[str]:
    """A tiny random BLIP-2, built once under the run folder, loaded by path like a real one."""
    from standins.blip2 import build_tiny_blip2

    path = build_tiny_blip2(workdir / "models" / "blip2-tiny")
    return [f"caption.model={path.resolve()}"]


@prepare("download")
def serve_demo_media(stack: contextlib.ExitStack, workdir: Path) -> list[str]:
    """Generate a source video for each demo clip and serve them on 127.0.0.1 (for yt-dlp)."""
    import pandas as pd

    from standins.media import MediaServer, make_sources

    clips = pd.read_parquet(workdir / "00-manifest" / "ledger", columns=["youtube_id", "start_s"])
    root = workdir / "standin-media"
    make_sources(root, [(str(r.youtube_id), int(r.start_s)) for r in clips.itertuples()])
    server = stack.enter_context(MediaServer(root))
    return [f"download.url_template={server.url_template()}"]


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
                    overrides += hook(stack, workdir)
                ctx = load_context(args.config, args.workdir, tuple(overrides))
                report = run_stage(cls, ctx, RunOptions())
                print(report.line(), flush=True)
    except AbortRun as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(run_status(ctx)))
    print(f"\nDemo outputs are in {workdir.resolve()}:")
    for child in sorted(workdir.iterdir()):
        print(f"  {child}")
    print("The captions are made by random-weight stand-in models: meaningless by design.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
