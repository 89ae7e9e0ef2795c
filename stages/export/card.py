"""The dataset card (``README.md``) of an export: rendering and offline validation.

The card's prose is the Jinja template ``card.md.j2`` beside this module; :func:`card_values`
computes what it shows (the metadata block, tables, lists and counts, all from the export's
statistics) and :func:`render_card` renders it. Jinja2 directly rather than ``huggingface_hub``'s
``DatasetCard.from_template``: that one re-serializes the metadata through ``DatasetCardData``
(other YAML than the block written here), drops the template's final newline and fills a missing
value with nothing, and it would make ``huggingface_hub`` a requirement of the export, which the
validation below keeps optional.

The Hub validates card metadata by posting it to ``/api/validate-yaml`` (``DatasetCard.validate``),
which needs the internet. Offline we parse the card with ``huggingface_hub``'s own
``DatasetCard.load`` / ``DatasetCardData`` and check the fields the Hub and ``datasets`` rely on;
every failure names its field.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from pipeline.errors import AbortRun
from stages.review.policy import VERDICTS, describe

if TYPE_CHECKING:
    import jinja2

    from stages.export.config import ExportConfig
    from stages.export.figures import Figure

CARD_TEMPLATE = "card.md.j2"  # in this package (package data: pyproject.toml)

# The Hub's size categories (a closed list on the Hub side).
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


class CardError(AbortRun):
    """A card field failed validation; the message names the field."""


def size_category(n: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>10M"


def card_metadata(stats: dict[str, Any], cfg: ExportConfig) -> dict[str, Any]:
    configs = []
    for variant in stats["variants"]:
        files = stats["files"][variant]
        entry: dict[str, Any] = {
            "config_name": variant,
            "data_files": [{"split": split, "path": f"data/{variant}/{split}-*.parquet"} for split in files],
        }
        if variant == stats["default_variant"]:
            entry["default"] = True
        configs.append(entry)
    return {
        "pretty_name": cfg.pretty_name,
        "language": ["en"],
        "license": "other",
        "license_name": "audiocaps-academic-use",
        "license_link": "LICENSE",
        "task_categories": ["text-generation"],
        "tags": ["audio-visual-captioning", "audio-captioning", "audiocaps", "video"],
        "size_categories": [size_category(sum(stats["counts"].values()))],
        "source_datasets": ["AudioCaps"],
        "configs": configs,
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _reasons(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:g}"


def _availability_table(availability: dict[str, dict[str, Any]]) -> str:
    rows = []
    for split, a in availability.items():
        later = {
            **{f"keyframes:{k}": v for k, v in a.get("failed_keyframes", {}).items()},
            **{f"caption:{k}": v for k, v in a.get("failed_caption", {}).items()},
            **{f"merge:{k}": v for k, v in a.get("failed_merge", {}).items()},
            **({"media missing": a["media_missing"]} if a.get("media_missing") else {}),
        }
        rows.append(
            [split, a["clips"], _reasons(a.get("failed_download", {})), _reasons(later), a["exported"]]
        )
    header = [
        "split",
        "AudioCaps clips",
        "not downloadable (reason)",
        "later failures (stage:reason)",
        "exported",
    ]
    return _table(header, rows)


def _statistics_table(splits: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = [
        [split, source, s["captions"], f"{s['words_per_caption']:.2f}", s["vocabulary"]]
        for split, entry in splits.items()
        for source, s in entry.items()
    ]
    return _table(["split", "captions", "#captions", "#words/caption", "#vocabulary"], rows)


def _scores_values(stats: dict[str, Any]) -> dict[str, Any]:
    """The "Quality scores" section's values: what was scored, by what, and the visual filter."""
    from stages.export.scores import SCORE_COLUMNS, percentile_name

    sc = stats.get("scores") or {}
    cols = sc.get("columns") or {}
    rows = [
        [
            f"`{name}`",
            f"`{percentile_name(name)}`",
            what,
            cols.get(name, {}).get("clips", 0),
            cols.get(name, {}).get("values", 0),
            _num(cols.get(name, {}).get("median")),
        ]
        for name, _, what in SCORE_COLUMNS
    ]
    vf = stats.get("visual_filter") or {}
    threshold = vf.get("min_visual_clip_percentile")
    return {
        "scored_clips": sc.get("clips", 0),
        "scored": any(r[4] for r in rows),
        "clip_model": ", ".join(f"`{m}`" for m in (sc.get("clip_model") or [])) or "n/a",
        "score_models": ", ".join(f"`{m}`" for m in (sc.get("score_models") or [])) or "n/a",
        "scores_table": _table(
            ["raw column", "percentile column", "what", "clips", "values", "median (raw)"], rows
        ),
        "threshold": None if threshold is None else f"{threshold:g}",
        "filtered": vf.get("splits") or {},  # split -> visual captions, dropped, unscored
    }


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "n/a"


def _listed(values: list[str], fmt: str = "{}") -> str:
    return ", ".join(fmt.format(v) for v in values) or "n/a"


def card_values(stats: dict[str, Any], cfg: ExportConfig, figures: list[Figure]) -> dict[str, Any]:
    """What the card template shows, computed from the export's statistics."""
    prov = stats["provenance"]
    review = {k: stats["review"].get(k, 0) for k in (*VERDICTS, "unreviewed")}
    reviewed = sum(review[k] for k in VERDICTS)
    # Several annotators per clip: how much they agreed (stages/review/policy.py says how it is measured).
    agreement = describe(stats["review_agreement"]) if reviewed and stats.get("review_agreement") else ""
    return {
        "meta": yaml.safe_dump(card_metadata(stats, cfg), sort_keys=False, allow_unicode=True),
        "pretty_name": cfg.pretty_name,
        "unreviewed": stats["unreviewed_test_items"],
        "stale": stats.get("stale_items", 0),
        "default_variant": stats["default_variant"],
        "configs": ", ".join(f"`{v}`" for v in stats["variants"]),
        "seed": stats["seed"],
        "embed_media": stats["embed_media"],
        "counts_table": _table(["split", "clips"], [[k, v] for k, v in stats["counts"].items()]),
        "availability_table": _availability_table(stats["availability"]),
        "sources": {k: _counts(prov.get(f"{k}_sources", {})) for k in ("video", "audio")},
        "caption_models": _listed(prov["caption_model"]),
        "caption_revisions": _listed(prov["caption_revision"]),
        "merge_models": _listed(prov["merge_model"]),
        "merge_backends": _listed(prov["merge_backend"]),
        "prompt_hashes": _listed(prov["merge_prompt_hash"], "`{}`"),
        "review": review,
        "reviewed": reviewed,
        "agreement": agreement,
        **_scores_values(stats),
        "figures": figures,
        "tokenization": stats["tokenization"],
        "statistics_table": _statistics_table(stats["splits"]),
    }


def _template() -> jinja2.Template:
    from importlib.resources import files

    import jinja2

    env = jinja2.Environment(
        autoescape=False,  # Markdown, not HTML: text goes in as it is
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.from_string(files(__package__).joinpath(CARD_TEMPLATE).read_text(encoding="utf-8"))


def render_card(stats: dict[str, Any], cfg: ExportConfig, figures: list[Figure] | None = None) -> str:
    """The card: :func:`card_values` rendered by the template :data:`CARD_TEMPLATE`."""
    return _template().render(card_values(stats, cfg, figures or []))


def validate_card(card_path: Path, folder: Path | None = None) -> dict[str, Any]:
    """Parse the card with ``huggingface_hub`` and check its metadata; raises :class:`CardError`.

    Without ``huggingface_hub`` the YAML is still parsed and checked. Returns the metadata.
    """
    text = card_path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise CardError(f"{card_path}: no YAML metadata block between '---' lines at the top")
    try:
        from huggingface_hub import DatasetCard, DatasetCardData
    except ImportError:
        meta = yaml.safe_load(text[4 : text.index("\n---\n", 4)]) or {}
    else:
        try:
            card = DatasetCard.load(card_path)
            meta = card.data.to_dict()
            DatasetCardData(**meta)
        except Exception as exc:
            raise CardError(f"{card_path}: huggingface_hub cannot parse the card: {exc}") from exc
    _check_fields(card_path, meta, folder or card_path.parent)
    return meta


def _check_fields(card_path: Path, meta: dict[str, Any], folder: Path) -> None:
    def fail(field: str, why: str) -> NoReturn:
        raise CardError(f"{card_path}: card field {field}: {why}")

    if not isinstance(meta, dict):
        fail("(top level)", "the metadata must be a mapping")
    for key in ("pretty_name", "license"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            fail(key, "missing or not a non-empty string")
    if meta["license"] == "other":
        for key in ("license_name", "license_link"):
            if not isinstance(meta.get(key), str) or not meta[key]:
                fail(key, "required when license is 'other'")
    for key in ("language", "task_categories", "tags", "size_categories"):
        value = meta.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            fail(key, "must be a list of non-empty strings")
    known = {name for _, name in SIZE_CATEGORIES} | {"n>10M"}
    for i, value in enumerate(meta["size_categories"]):
        if value not in known:
            fail(f"size_categories[{i}]", f"{value!r} is not one of {sorted(known)}")
    configs = meta.get("configs")
    if not isinstance(configs, list) or not configs:
        fail("configs", "must be a non-empty list")
    names = set()
    defaults = 0
    for i, conf in enumerate(configs):
        where = f"configs[{i}]"
        if not isinstance(conf, dict) or not isinstance(conf.get("config_name"), str):
            fail(f"{where}.config_name", "missing")
        if conf["config_name"] in names:
            fail(f"{where}.config_name", f"{conf['config_name']!r} appears twice")
        names.add(conf["config_name"])
        defaults += bool(conf.get("default"))
        files = conf.get("data_files")
        if not isinstance(files, list) or not files:
            fail(f"{where}.data_files", "must be a non-empty list of {split, path}")
        for j, entry in enumerate(files):
            if not isinstance(entry, dict) or not entry.get("split") or not entry.get("path"):
                fail(f"{where}.data_files[{j}]", "needs 'split' and 'path'")
            if not glob.glob(str(folder / entry["path"])):
                fail(f"{where}.data_files[{j}].path", f"{entry['path']!r} matches no file in {folder}")
    if defaults > 1:
        fail("configs", "more than one config is marked default")
