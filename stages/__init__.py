"""The AudioVisualCaps stages: a package per stage with several modules (``download/``,
``caption/``, ``merge/``, ``export/``), a module where one is enough (``manifest``, ``keyframes``,
``publish``); stage 5 is the ``review`` package. Beside them, ``tools`` (the external programs:
ffmpeg, java) and ``doctor`` (``avcaps doctor``) serve the stages, the stand-ins and the evaluation
kit. Heavy dependencies are imported lazily.

This package is the application's composition root: the engine finds the stages, the config
schema, the extra CLI command groups and its other application settings through the names below,
so nothing here is imported until a name is looked up.
"""

STAGES: list[str] = [
    "stages.manifest:ManifestStage",
    "stages.download.stage:DownloadStage",
    "stages.keyframes:KeyframesStage",
    "stages.caption.stage:CaptionStage",
    "stages.merge.stage:MergeStage",
    "stages.review.push:ReviewStage",
    "stages.export.stage:ExportStage",
    "stages.publish:PublishStage",
]
CONFIG_MODEL = "stages.config:RunConfig"
# What the engine's CLI and status take from the application (they know no stage by name):
DEFAULT_CONFIG = "manifests/audiocaps.yaml"  # `--config` when none is given
GROUP_COLUMN = "split"  # `avcaps status` also counts per value of this clip-table column
# `avcaps run` options that set one integer config key: documented (`--sample N`), keep them.
RUN_ALIASES: dict[str, dict[str, object]] = {
    "sample": {
        "key": "manifest.sample_per_split",
        "min": 1,
        "help": "Stage 0: a seeded sample of N clips per split",
    },
}
COMMANDS: dict[str, str] = {
    "doctor": "stages.doctor:doctor",
    "eval": "evalkit.cli:eval_cmd",
    "fetch-spice": "evalkit.cli:fetch_spice",
    "perturb": "evalkit.cli:perturb",
    "robustness": "evalkit.cli:robustness",
    "review": "stages.review.cli:review",
    "sources": "stages.download.cli:sources",
}
# How to get a missing optional module (`avcaps` prints it after the module's name).
MISSING_MODULE_HINT = "`make setup` installs every extra (or pip install -e '.[EXTRA]', see pyproject.toml)"
