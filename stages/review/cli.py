"""``avcaps review``: pull the reviews, show their figures, start the local server."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import click

from pipeline.cli import config_options, load_context
from stages.review.push import ReviewStage


@click.group()
def review() -> None:
    """Human review of the test merges in Label Studio (push is `avcaps run review`)."""


@review.command()
@config_options
def pull(config_path: Path, workdir: Path | None, overrides: tuple[str, ...]) -> None:
    """Read the completed annotations into DIR/05-review/reviews.parquet (nothing reviewed is lost)."""
    from stages.review.pull import pull as do_pull

    ctx = load_context(config_path, workdir, overrides)
    report = do_pull(ctx)
    for line in report.lines():
        click.echo(line)


@review.command()
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def status(config_path: Path, workdir: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """done / total, accept / edited / rejected rates, mean word edit distance merge -> final,
    agreement between annotators (Cohen's or Fleiss' kappa) and the edit distance between them.

    Figures come from the last `avcaps review pull`.
    """
    from stages.review.policy import describe
    from stages.review.pull import review_status

    ctx = load_context(config_path, workdir, overrides)
    st = review_status(ctx)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"reviewed {st['done']} / {st['total']} pushed clips ({st['pending']} pending)")
    for verdict, n in st["counts"].items():
        rate = st["rates"][verdict]
        click.echo(f"  {verdict:<9} {n:>6}  {'' if rate is None else f'{rate:.1%}'}")
    dist = st["mean_word_edit_distance"]
    click.echo(f"mean word edit distance merge -> final: {'n/a' if dist is None else f'{dist:.2f}'}")
    click.echo(f"disagreements: {st['disagreements']}")
    n = st["annotators_per_task"]
    if n > 1:
        click.echo(f"clips with all {n} answers: {st['complete']} of {st['done']} reviewed")
    if st["set_aside"]:
        click.echo(f"answers set aside (unusable, see `avcaps review pull`): {st['set_aside']}")
    if st["outdated_annotations"]:
        n = st["outdated_annotations"]
        click.echo(f"outdated annotations (made on an earlier merge of their clip; not used): {n}")
    click.echo(describe(st["agreement"]))


@review.command()
@config_options
@click.option("--port", type=int, default=None, help="Port (default: the one in review.url).")
def server(config_path: Path, workdir: Path | None, overrides: tuple[str, ...], port: int | None) -> None:
    """Start Label Studio on 127.0.0.1 for this run folder (data in DIR/05-review/label-studio).

    Needs LABEL_STUDIO_USERNAME (e-mail), LABEL_STUDIO_PASSWORD and LABEL_STUDIO_API_KEY (40 hex).
    Runs until Ctrl-C.
    """
    import signal
    import sys
    import time

    from stages.review.connection import document_root, review_config
    from stages.review.server import LabelStudioServer, credentials_from_env

    ctx = load_context(config_path, workdir, overrides)
    cfg = review_config(ctx.config)
    url = urlparse(cfg.url)
    host = url.hostname or "127.0.0.1"
    creds = credentials_from_env(api_key_env=cfg.api_key_env)
    root = document_root(ctx.config, ctx.workdir)
    data_dir = ctx.stage_dir(ReviewStage) / "label-studio"
    srv = LabelStudioServer(cfg.server_venv, data_dir, root, creds, host=host, port=port or url.port or 8080)
    click.echo(
        f"starting Label Studio (data {data_dir}, media root {root}); the first start migrates (~1 min)"
    )
    # A plain `kill` of this command must stop the server too (it runs in its own process group).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with srv:
        click.echo(f"Label Studio is up at {srv.url}")
        click.echo(f"  admin login: {creds.username} with the password in LABEL_STUDIO_PASSWORD")
        click.echo("  annotators: the admin invites them (Organization -> Add People gives a signup link;")
        click.echo("  open signup is disabled), then they log in with their e-mail and password.")
        click.echo("  push tasks with `make stage-5`, pull reviews with `make review-pull`. Ctrl-C stops.")
        try:
            while srv.proc is not None and srv.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            click.echo("stopping Label Studio")
