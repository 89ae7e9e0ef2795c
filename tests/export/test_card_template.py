"""The card's template (stages/export/card.md.j2) and the values card.py computes for it."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from stages.export import card
from stages.export.config import ExportConfig
from tests.export.conftest import REPO


@pytest.fixture(scope="module")
def stats(base_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import shutil

    from pipeline.cli import load_context
    from pipeline.runner import run_stage
    from pipeline.stage import RunOptions
    from stages.export.stage import ExportStage

    workdir = tmp_path_factory.mktemp("card") / "run"
    shutil.copytree(base_run, workdir)
    ctx = load_context(REPO / "manifests/audiocaps.yaml", workdir, ("export.figures=false",))
    run_stage(ExportStage, ctx, RunOptions(progress=False))
    return json.loads((workdir / "export" / "statistics.json").read_text())


def test_the_template_uses_every_value_and_no_other(stats: dict[str, object]) -> None:
    import jinja2
    from jinja2 import meta

    source = (REPO / "stages/export" / card.CARD_TEMPLATE).read_text(encoding="utf-8")
    used = meta.find_undeclared_variables(jinja2.Environment().parse(source))
    assert used == set(card.card_values(stats, ExportConfig(), []))


def test_a_value_missing_fails_the_render(stats: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    import jinja2

    values: Callable[..., dict[str, object]] = card.card_values

    def without_seed(*args: object) -> dict[str, object]:
        out = values(*args)
        del out["seed"]
        return out

    monkeypatch.setattr(card, "card_values", without_seed)
    with pytest.raises(jinja2.UndefinedError, match="seed"):
        card.render_card(stats, ExportConfig(), [])


def test_the_template_is_package_data() -> None:
    # A wheel carries the non-Python files of a package only where pyproject.toml lists them.
    listed = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = REPO / "stages/export"
    data = [p.name for p in folder.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert card.CARD_TEMPLATE in data
    for name in data:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in listed.get("stages.export", [])), name
