"""The AudioVisualCaps stages: one module each, heavy dependencies imported lazily.

This package is the application's composition root: the engine finds the stages, the config
schema and the extra CLI command groups through the names below.
"""

STAGES: list[str] = [
    "stages.manifest:ManifestStage",
    "stages.review:ReviewStage",
]
CONFIG_MODEL = "stages.config:RunConfig"
COMMANDS: dict[str, str] = {"review": "review.cli:review"}
