"""Typed run configuration: YAML manifests validated by pydantic, with CLI overrides.

The engine only provides the mechanics (strict models, loading, ``--set key.path=value``
overrides, dumping); the concrete schema of a run lives with the stages (``stages/config.py``).
Relative paths in a manifest are resolved against the current directory (the repository root when
run through ``make``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import AbortRun


class ConfigError(AbortRun):
    """The configuration is invalid; the message names the file and key path."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunConfigBase(StrictModel):
    """What the engine needs of any application's run config (its ``CONFIG_MODEL`` subclasses
    this): where the run folder is. The sections are the application's."""

    workdir: Path = Field(Path("runs/run"), description="Run folder: ledgers, media, export.")


class StageConfig(StrictModel):
    """Settings every item stage has; stage sections subclass this."""

    batch_size: int = Field(32, gt=0, description="Items per process() call and per ledger commit.")
    max_attempts: int = Field(3, gt=0, description="Attempts for an item failing transiently.")
    backoff_s: float = Field(2.0, ge=0, description="First retry delay; doubles per attempt.")
    backoff_max_s: float = Field(300.0, ge=0, description="Cap on the retry delay.")
    commit_interval_s: float = Field(
        1.0,
        ge=0,
        description="Least seconds between two ledger commits of one process: results of faster batches "
        "wait in memory (a kill loses at most this much finished work, or the batch in flight); 0 commits "
        "every batch.",
    )
    min_free_mb: float = Field(
        100.0,
        ge=0,
        description="Free space (MB) kept on every filesystem the stage writes to: below it the run stops "
        "(exit 5) before the next batch, with room left to commit what finished. Keep it above the "
        "largest file the stage writes: a tool that hits a full disk in a subprocess (ffmpeg) is told "
        "from a failed item only by the free space left.",
    )


M = TypeVar("M", bound=BaseModel)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so ``64``, ``true`` and ``[a, b]`` work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY.PATH=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"invalid configuration in {source}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_config(model: type[M], path: Path | str, overrides: list[str] | None = None) -> M:
    """Load ``path`` as YAML, apply ``overrides`` and validate it against ``model``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 ({exc})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what ``avcaps config show`` prints and each run saves)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
