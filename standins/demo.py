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


def _upstream_missing(cls: type) -> str | None:
    """The name of an upstream stage that is not registered (its branch not merged yet), if any."""
    from pipeline.registry import ancestors

    try:
        ancestors(cls)  # type: ignore[arg-type]
    except AbortRun as exc:
        return str(exc)
    return None


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
                missing = _upstream_missing(cls)
                if missing:
                    print(f"{cls.dirname()}: skipped, {missing}", flush=True)
                    continue
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
