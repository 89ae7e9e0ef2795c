"""The AudioVisualCaps stages: one module each, heavy dependencies imported lazily.

This package is the application's composition root: the engine finds the stages, the config
schema and the extra CLI command groups through the names below.
"""

STAGES: list[str] = [
    "stages.manifest:ManifestStage",
    "stages.download:DownloadStage",
    "stages.keyframes:KeyframesStage",
    "stages.caption:CaptionStage",
    "stages.merge:MergeStage",
    "stages.review:ReviewStage",
    "stages.export:ExportStage",
    "stages.publish:PublishStage",
]
CONFIG_MODEL = "stages.config:RunConfig"
COMMANDS: dict[str, str] = {
    "doctor": "stages.doctor:doctor",
    "eval": "evalkit.cli:eval_cmd",
    "fetch-spice": "evalkit.cli:fetch_spice",
    "perturb": "evalkit.cli:perturb",
    "robustness": "evalkit.cli:robustness",
    "review": "review.cli:review",
}
# How to get a missing optional module (`avcaps` prints it after the module's name).
MISSING_MODULE_HINT = "`make setup` installs every extra (or pip install -e '.[EXTRA]', see pyproject.toml)"
