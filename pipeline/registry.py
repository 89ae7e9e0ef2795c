"""Finds the stages and the config schema of the application without importing heavy code.

The engine knows no stage by name: the application package (``stages`` by default, overridable
with ``AVCAPS_APP`` so tests can plug in toy stages) lists them as ``"module:Class"`` strings in
``STAGES``, its config model in ``CONFIG_MODEL`` and extra CLI command groups in ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.config import RunConfigBase
from pipeline.errors import AbortRun

if TYPE_CHECKING:
    from pipeline.stage import Stage


def app() -> ModuleType:
    return importlib.import_module(os.environ.get("AVCAPS_APP", "stages"))


def load_object(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def stage_classes() -> list[type[Stage]]:
    classes = [load_object(s) for s in app().STAGES]
    return sorted(classes, key=lambda c: c.number)


def config_model() -> type[RunConfigBase]:
    model = load_object(app().CONFIG_MODEL)
    if not (isinstance(model, type) and issubclass(model, RunConfigBase)):
        raise AbortRun(f"{app().CONFIG_MODEL} is not a run config (subclass pipeline.config.RunConfigBase)")
    return model


def find_stage(key: str | int) -> type[Stage]:
    """A stage by number (``1``, ``01``) or name (``download``)."""
    classes = stage_classes()
    text = str(key).strip().lower()
    for cls in classes:
        if text == cls.name or text == cls.dirname() or (text.isdigit() and int(text) == cls.number):
            return cls
    valid = ", ".join(f"{c.number} ({c.name})" for c in classes)
    raise AbortRun(f"unknown stage {key!r}; valid stages: {valid}")


def ancestors(cls: type[Stage]) -> list[type[Stage]]:
    """The upstream chain of a stage, root first."""
    chain: list[type[Stage]] = []
    up = cls.upstream
    while up is not None:
        parent = find_stage(up)
        chain.append(parent)
        up = parent.upstream
    return list(reversed(chain))
