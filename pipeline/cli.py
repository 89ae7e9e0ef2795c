"""The ``avcaps`` command line: ``run``, ``status``, ``repair``, ``config show`` (+ the application's
groups).

Every command takes ``--config FILE`` and ``--workdir DIR`` so two runs never share state by
accident: the run folder comes from the config's ``workdir`` unless ``--workdir`` overrides it.
Exit status: 0 when the stage ran, even if some items failed (their failures are in the ledger);
2 when the run itself could not proceed (bad config, bad manifest, missing upstream); 3 when
another process is already running the same stage (and an overlapping shard) of the run folder;
4 when the stage's source kept refusing requests through the stage's cool-downs (RunThrottled:
what finished is committed; rerun later); 5 when the machine cannot go on (RunHalted: a full disk
or quota, a read-only filesystem, no memory or file handles; what finished is committed, no item
is marked failed; rerun after the fix). A damaged ledger part stops ``run`` with 2 until
``avcaps repair`` sets it aside.

What is the application's, the application declares (:mod:`pipeline.registry`): the default
``--config`` (``DEFAULT_CONFIG``) and ``avcaps run`` options that set one config key
(``RUN_ALIASES``, e.g. ``--sample``). They are read when a command is parsed, not at import, so a
test can plug in another application (``AVCAPS_APP``) after importing this module.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.errors import AbortRun


class AppDefault(click.Option):
    """An option whose default the application declares (an attribute of its package)."""

    def __init__(self, *args: Any, app_attr: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app_attr = app_attr

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        from pipeline.registry import app

        return getattr(app(), self.app_attr, None)


def alias_options() -> list[click.Option]:
    """``avcaps run`` options declared by the application as shorthands for one integer config
    key: ``RUN_ALIASES = {name: {"key": "section.key", "min": 1, "help": "..."}}``."""
    from pipeline.registry import app

    return [
        click.Option(
            [f"--{name}"],
            type=click.IntRange(min=spec.get("min")),
            default=None,
            help=f"{spec['help']} (sets {spec['key']}).",
        )
        for name, spec in getattr(app(), "RUN_ALIASES", {}).items()
    ]


class RunCommand(click.Command):
    """``avcaps run``: the application's alias options go after ``--limit``."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        at = next(i for i, p in enumerate(params) if p.name == "limit") + 1
        return [*params[:at], *alias_options(), *params[at:]]


def alias_overrides(values: dict[str, Any]) -> list[str]:
    """``--set`` overrides for the alias options given (``values``: option name -> value)."""
    from pipeline.registry import app

    aliases = getattr(app(), "RUN_ALIASES", {})
    return [f"{aliases[name]['key']}={v}" for name, v in values.items() if name in aliases and v is not None]


def config_options(fn: Any) -> Any:
    fn = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a config value, e.g. --set caption.batch_size=64 (repeatable).",
    )(fn)
    fn = click.option(
        "--workdir",
        type=click.Path(path_type=Path),
        default=None,
        help="Run folder (overrides the config's workdir).",
    )(fn)
    fn = click.option(
        "--config",
        "config_path",
        cls=AppDefault,
        app_attr="DEFAULT_CONFIG",
        type=click.Path(path_type=Path),
        show_default=True,
        help="YAML run manifest.",
    )(fn)
    return fn


def load_context(config_path: Path | None, workdir: Path | None, overrides: tuple[str, ...]) -> Any:
    from pipeline.config import load_config
    from pipeline.registry import config_model
    from pipeline.stage import RunContext

    if config_path is None:
        raise AbortRun("no --config given, and the application declares no DEFAULT_CONFIG")
    extra = list(overrides)
    if workdir is not None:
        extra.append(f"workdir={workdir}")
    cfg = load_config(config_model(), config_path, extra)
    return RunContext(workdir=Path(cfg.workdir), config=cfg)


class AvcapsGroup(click.Group):
    """Turns :class:`AbortRun` (and a missing optional module) into a one-line error and exit code
    2, and loads the application's command groups lazily (``avcaps review``, ``avcaps eval`` ...)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from pipeline.registry import app

        return sorted(set(super().list_commands(ctx)) | set(getattr(app(), "COMMANDS", {})))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None:
            return cmd
        from pipeline.registry import app, load_object

        spec = getattr(app(), "COMMANDS", {}).get(name)
        return load_object(spec) if spec else None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AbortRun as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except ModuleNotFoundError as exc:
            # An optional dependency (an extra) that is not installed: one line, not a traceback
            # (-v logs it); the application says how to install it (its MISSING_MODULE_HINT).
            logging.getLogger("avcaps").debug("missing module", exc_info=True)
            from pipeline.registry import app

            hint = getattr(app(), "MISSING_MODULE_HINT", "")
            click.echo(
                f"error: Python module {exc.name!r} is not installed" + (f"; {hint}" if hint else ""),
                err=True,
            )
            sys.exit(AbortRun.exit_code)


@click.group(cls=AvcapsGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Build AudioVisualCaps: staged, resumable batch jobs over AudioCaps clips."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@main.command(cls=RunCommand)
@click.argument("stage")
@config_options
@click.option("--shard", default=None, metavar="I/N", help="Only items whose clip_id hashes to shard I of N.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Process at most N pending items.")
@click.option("--retry-failed", is_flag=True, help="Re-queue every failed item, permanent ones too.")
@click.option("--force", is_flag=True, help="Redo every item, finished ones too.")
@click.option(
    "--drop-previous",
    is_flag=True,
    help="A redo (forced or stale) that fails replaces the item's previous ok result; by default "
    "the previous result stays current and the failure is recorded beside it.",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Run item batches in this process, or as a Ray Dataset on a Ray cluster.",
)
@click.option(
    "--address",
    "ray_address",
    default=None,
    help="Ray cluster address (with --executor ray); default: a local cluster.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Ray workers (tasks or actors) for this stage; default: CPUs or GPUs available.",
)
@click.option(
    "--dry-run",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Try N items the run would take and print what the stage would do, writing nothing "
    "(stages that offer it).",
)
def run(
    stage: str,
    config_path: Path,
    workdir: Path | None,
    overrides: tuple[str, ...],
    shard: str | None,
    limit: int | None,
    retry_failed: bool,
    force: bool,
    drop_previous: bool,
    no_progress: bool,
    executor: str,
    ray_address: str | None,
    concurrency: int | None,
    dry_run: int | None,
    **aliases: Any,
) -> None:
    """Run STAGE (a number 0-7 or a name such as `download`)."""
    from pipeline.registry import find_stage
    from pipeline.runner import dry_run_stage, run_stage
    from pipeline.sharding import parse_shard
    from pipeline.stage import RunOptions

    overrides = (*overrides, *alias_overrides(aliases))
    # A scheduler's SIGTERM (Slurm at the time limit, `kill`) ends the run like Ctrl-C: the batch in
    # flight is lost, committed batches stay, and the run log says it was interrupted.
    signal.signal(signal.SIGTERM, _interrupt)
    ctx = load_context(config_path, workdir, overrides)
    cls = find_stage(stage)
    options = RunOptions(
        shard=parse_shard(shard),
        limit=limit,
        retry_failed=retry_failed,
        force=force,
        drop_previous=drop_previous,
        progress=not no_progress,
        executor=executor,
        ray_address=ray_address,
        concurrency=concurrency,
    )
    if dry_run is not None:
        for text in dry_run_stage(cls, ctx, options, dry_run):
            click.echo(text, nl=False)
        return
    report = run_stage(cls, ctx, options)
    click.echo(report.line())


@main.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def status(config_path: Path, workdir: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Show every stage: ok / failed_permanent / failed_transient / pending, with reasons."""
    from pipeline.status import format_table, run_status

    ctx = load_context(config_path, workdir, overrides)
    result = run_status(ctx)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else format_table(result))


@main.command()
@config_options
@click.option("--stage", "stage_key", default=None, metavar="N", help="Only this stage (a number or name).")
def repair(
    config_path: Path, workdir: Path | None, overrides: tuple[str, ...], stage_key: str | None
) -> None:
    """Check every ledger part (and stats.json) of the run folder; move damaged ones to the
    stage's quarantine/ folder (never deleted) and say which items the next run redoes."""
    from pipeline.registry import find_stage, stage_classes
    from pipeline.repair import repair as repair_run

    ctx = load_context(config_path, workdir, overrides)
    classes = [find_stage(stage_key)] if stage_key is not None else stage_classes()
    for line in repair_run(ctx, classes):
        click.echo(line)


@main.group()
def config() -> None:
    """Inspect run manifests."""


@config.command("show")
@config_options
def config_show(config_path: Path, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults filled in, overrides applied)."""
    from pipeline.config import dump_config

    ctx = load_context(config_path, workdir, overrides)
    click.echo(dump_config(ctx.config), nl=False)


if __name__ == "__main__":
    main()
