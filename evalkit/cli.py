"""The ``avcaps eval``, ``avcaps fetch-spice``, ``avcaps perturb`` and ``avcaps robustness`` commands.

Heavy work lives in the modules beside this one; these functions only parse options and print.
"""

from __future__ import annotations

from pathlib import Path

import click

SPICE_DIR_HELP = (
    "Folder with the CoreNLP 3.6.0 jars for SPICE [env AVCAPS_SPICE_DIR; default ~/.cache/avcaps/spice]."
)


def _spice_dir_option(fn):
    return click.option(
        "--spice-dir",
        type=click.Path(path_type=Path),
        envvar="AVCAPS_SPICE_DIR",
        default=None,
        help=SPICE_DIR_HELP,
    )(fn)


def _reference_options(fn):
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


@click.command("perturb")
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A run folder: the middle keyframe and audio of every clip with ok keyframes.",
)
@click.option(
    "--split", default="test", show_default=True, help="With --run: only this split ('all' for every clip)."
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Instead of --run: a .csv or .jsonl with clip_id,image,audio.",
)
@click.option(
    "--export",
    "export_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Instead of --run: an export folder (its --split clips, embedded media or paths).",
)
@click.option("--config-name", default=None, help="With --export: the config to read (default: the first).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (one subfolder per condition).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the noise and the shuffles.")
@click.option(
    "--noise-std",
    type=float,
    default=0.1,
    show_default=True,
    help="Standard deviation of the Gaussian audio noise (full scale = 1.0; 0.1 is about -20 dBFS RMS).",
)
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    help="Only these conditions (repeatable; default all eight).",
)
def perturb(
    run_dir: Path | None,
    split: str,
    manifest: Path | None,
    export_dir: Path | None,
    config_name: str | None,
    out: Path,
    seed: int,
    noise_std: float,
    conditions: tuple[str, ...],
) -> None:
    """Write one input set per robustness condition (clean, visual black/white/noise, audio
    silent/Gaussian, shuffled visual/audio): OUT/<condition>/manifest.csv (clip_id,image,audio)."""
    from evalkit.perturb import CONDITIONS, read_export_sources, read_manifest_sources, read_run_sources
    from evalkit.perturb import perturb as run_perturb
    from pipeline.errors import AbortRun

    if sum(x is not None for x in (run_dir, manifest, export_dir)) != 1:
        raise AbortRun("give exactly one of --run DIR, --export DIR and --manifest FILE")
    if run_dir is not None:
        sources = read_run_sources(run_dir, None if split == "all" else split)
    elif export_dir is not None:
        sources = read_export_sources(export_dir, out / "sources", split, config_name)
    else:
        assert manifest is not None  # exactly one of the three was given
        sources = read_manifest_sources(manifest)
    summary = run_perturb(sources, out, seed=seed, noise_std=noise_std, conditions=conditions or CONDITIONS)
    click.echo(f"{summary['clips']} clips x {len(summary['conditions'])} conditions -> {out}")
    for cid, why in summary["skipped"].items():
        click.echo(f"skipped {cid}: {why}", err=True)
    for cond, path in summary["manifests"].items():
        click.echo(f"  {cond:16s} {path}")


@click.command("robustness")
@click.option(
    "--pred",
    "preds",
    multiple=True,
    metavar="CONDITION=FILE",
    help="Predictions of one condition (repeatable), e.g. --pred clean=clean.jsonl.",
)
@click.option(
    "--preds-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="A folder of <condition>.jsonl / <condition>.csv prediction files.",
)
@_reference_options
@click.option("--allow-missing", is_flag=True, help="Score the matched clips even if some lack a prediction.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Folder for robustness.md/.json/.png."
)
@click.option("--no-spice", is_flag=True, help="Skip SPICE; the bias index then uses CIDEr-D.")
@_spice_dir_option
def robustness(
    preds: tuple[str, ...],
    preds_dir: Path | None,
    refs_path: Path,
    config_name: str | None,
    split: str,
    allow_missing: bool,
    out: Path,
    no_spice: bool,
    spice_dir: Path | None,
) -> None:
    """Score one prediction file per condition and write the Table-1-style report: metrics per
    condition, relative drops against clean, and the modality-bias index."""
    from evalkit.data import read_predictions, read_references
    from evalkit.metrics import evaluate_sets
    from evalkit.robustness import build_report, report_markdown, write_report
    from pipeline.errors import AbortRun

    files: dict[str, Path] = {}
    if preds_dir is not None:
        for p in sorted(preds_dir.iterdir()):
            if p.suffix.lower() in (".jsonl", ".csv"):
                if p.stem in files:
                    raise AbortRun(f"{preds_dir}: two prediction files for condition {p.stem}")
                files[p.stem] = p
    for spec in preds:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise AbortRun(f"--pred {spec!r}: expected CONDITION=FILE")
        files[name] = Path(path)
    if not files:
        raise AbortRun("no predictions: give --pred CONDITION=FILE or --preds-dir DIR")
    from evalkit.perturb import CONDITIONS

    order = sorted(files, key=lambda c: (CONDITIONS.index(c) if c in CONDITIONS else len(CONDITIONS), c))
    refs = read_references(refs_path, split, config_name)
    sets = {c: read_predictions(files[c]) for c in order}
    scores = evaluate_sets(
        sets, refs, allow_missing=allow_missing, spice_dir=spice_dir, use_spice=not no_spice
    )
    report = build_report(scores)
    paths = write_report(report, out)
    click.echo(report_markdown(report), nl=False)
    click.echo("written: " + ", ".join(str(p) for p in paths.values()))
