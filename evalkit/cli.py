"""The ``avcaps eval``, ``avcaps fetch-spice``, ``avcaps perturb`` and ``avcaps robustness`` commands.

Heavy work lives in the modules beside this one; these functions only parse options and print.
"""

from __future__ import annotations

from pathlib import Path

import click

SPICE_DIR_HELP = (
    "Folder with the CoreNLP 3.6.0 jars for SPICE [env AVCAPS_SPICE_DIR; default ~/.cache/avcaps/spice]."
)


def _spice_dir_option(fn):  # type: ignore[no-untyped-def]
    return click.option(
        "--spice-dir",
        type=click.Path(path_type=Path),
        envvar="AVCAPS_SPICE_DIR",
        default=None,
        help=SPICE_DIR_HELP,
    )(fn)


def _reference_options(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--split", default="test", show_default=True, help="Split of an export folder.")(fn)
    fn = click.option("--config-name", default=None, help="Config of an export folder with several.")(fn)
    fn = click.option(
        "--refs",
        "refs_path",
        type=click.Path(path_type=Path),
        required=True,
        help="References: an export (or run) folder, a .parquet, .jsonl or .csv file, or an AudioCaps CSV.",
    )(fn)
    return fn


@click.command("eval")
@click.argument("predictions", type=click.Path(path_type=Path))
@_reference_options
@click.option(
    "--allow-missing", is_flag=True, help="Score the matched clips even if some references lack a prediction."
)
@click.option(
    "--format", "style", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True
)
@click.option(
    "--output", type=click.Path(path_type=Path), default=None, help="Also write the report to this file."
)
@click.option("--no-spice", is_flag=True, help="Skip SPICE (and so SPIDEr) even when its jars are installed.")
@_spice_dir_option
def eval_cmd(
    predictions: Path,
    refs_path: Path,
    config_name: str | None,
    split: str,
    allow_missing: bool,
    style: str,
    output: Path | None,
    no_spice: bool,
    spice_dir: Path | None,
) -> None:
    """Score PREDICTIONS (.jsonl or .csv with clip_id, caption) with BLEU-1/4, ROUGE-L, METEOR,
    CIDEr-D, SPICE and SPIDEr, exactly as pycocoevalcap does."""
    from evalkit.data import read_predictions, read_references
    from evalkit.metrics import evaluate
    from evalkit.report import format_scores
    from pipeline.io import atomic_write_text

    refs = read_references(refs_path, split, config_name)
    preds = read_predictions(predictions)
    scores = evaluate(preds, refs, allow_missing=allow_missing, spice_dir=spice_dir, use_spice=not no_spice)
    text = format_scores(scores, style)
    if output is not None:
        atomic_write_text(output, text)
    click.echo(text, nl=False)


@click.command("fetch-spice")
@_spice_dir_option
@click.option(
    "--from-zip",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Take the jars from stanford-corenlp-full-2015-12-09.zip already on disk (no download).",
)
@click.option("--base-url", default=None, help="A Maven Central mirror serving stanford-corenlp/3.6.0/.")
def fetch_spice(spice_dir: Path | None, from_zip: Path | None, base_url: str | None) -> None:
    """Install the Stanford CoreNLP 3.6.0 jars that SPICE needs (checksummed)."""
    from evalkit.spice import MAVEN_BASE, check_jars, default_spice_dir, fetch_jars

    target = spice_dir or default_spice_dir()
    digests = fetch_jars(target, base_url or MAVEN_BASE, from_zip)
    for jar, digest in digests.items():
        click.echo(f"{digest}  {target / jar}")
    reason = check_jars(target)
    click.echo("SPICE ready" if reason is None else f"SPICE not ready: {reason}")
