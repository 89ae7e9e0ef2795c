"""The dataset card (``README.md``) of an export: rendering and offline validation.

The Hub validates card metadata by posting it to ``/api/validate-yaml`` (``DatasetCard.validate``),
which needs the internet. Offline we parse the card with ``huggingface_hub``'s own
``DatasetCard.load`` / ``DatasetCardData`` and check the fields the Hub and ``datasets`` rely on;
every failure names its field.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.errors import AbortRun
from stages.review.policy import describe

if TYPE_CHECKING:
    from stages.export.config import ExportConfig

# The Hub's size categories (a closed list on the Hub side).
SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)

AUDIOCAPS_BIBTEX = """@inproceedings{kim2019audiocaps,
  title     = {AudioCaps: Generating Captions for Audios in the Wild},
  author    = {Kim, Chris Dongjoo and Kim, Byeongchang and Lee, Hyunmin and Kim, Gunhee},
  booktitle = {Proceedings of the 2019 Conference of the North American Chapter of the Association
               for Computational Linguistics: Human Language Technologies (NAACL-HLT)},
  pages     = {119--132},
  year      = {2019}
}"""
PAPER_BIBTEX = """@misc{audiovisualcaps,
  title = {Listening without Looking: Modality Bias in Audio-Visual Captioning},
  note  = {Introduces AudioVisualCaps; authors and venue as in the published paper}
}"""


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


def scores_section(stats: dict[str, Any]) -> str:
    """The card's "Quality scores" section: what was scored, by what, and the visual filter."""
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
    scored = any(r[4] for r in rows)
    vf = stats.get("visual_filter") or {}
    threshold = vf.get("min_visual_clip_percentile")
    splits = vf.get("splits") or {}
    if threshold is None:
        filt = (
            "No visual caption was filtered (`export.min_visual_clip_percentile` off): "
            "`visual_caption_dropped` is false everywhere."
        )
    else:
        per = (
            "; ".join(
                f"{split}: **{c['dropped']} of {c['visual_captions']}** visual captions dropped"
                + (f" ({c['unscored']} without a score, kept)" if c["unscored"] else "")
                for split, c in splits.items()
            )
            or "no split is built by a variant"
        )
        filt = (
            f"`export.min_visual_clip_percentile` = {threshold:g}: a visual caption whose "
            f"`visual_caption_clip_percentile` is below it is left out of the references of the "
            f"variant-built splits (the clip keeps its audio caption(s); `random` picks the audio "
            f"caption, `concat` and `and` give it alone, `per_modality` has no visual reference; the "
            f"`visual_caption` column keeps the caption and `visual_caption_dropped` is true). "
            f"Captions without a score are never dropped. {per}."
        )
    models = ", ".join(f"`{m}`" for m in (sc.get("score_models") or [])) or "n/a"
    clip_model = ", ".join(f"`{m}`" for m in (sc.get("clip_model") or [])) or "n/a"
    head = (
        "Every caption is scored against the clip's media: CLIP (keyframe <-> text) and CLAP "
        "(audio <-> text) cosine similarities, so a merge can be compared with what it merged. Raw "
        "cosines are not comparable across models, so each column also comes as a **percentile** "
        f"(0-100, the share of values at or below it; 100 = best) over this export: every exported "
        f"clip once ({sc.get('clips', 0)} clips, all splits), per column, lists flattened (one value "
        "per caption). A clip without scores (scoring off in its run, or rows made before scoring "
        "existed) has nulls, counted nowhere."
    )
    if not scored:
        return f"{head}\n\n**No clip in this export has scores.**\n\n{filt}\n"
    table = _table(["raw column", "percentile column", "what", "clips", "values", "median (raw)"], rows)
    return f"{head}\n\nScorers: stage 3 CLIP {clip_model}; stage 4 {models}.\n\n{table}\n\n{filt}\n"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "n/a"


def figures_section(figures: list[Any]) -> str:
    if not figures:
        return "No figures in this export (`export.figures` off).\n"
    return "\n".join(f"![{f.title}]({f.path})\n\n*{f.title}.*\n" for f in figures)


def render_card(stats: dict[str, Any], cfg: ExportConfig, figures: list[Any] | None = None) -> str:
    meta = yaml.safe_dump(card_metadata(stats, cfg), sort_keys=False, allow_unicode=True)
    prov = stats["provenance"]
    review = stats["review"]
    reviewed = sum(review.get(k, 0) for k in ("accept", "edited", "rejected"))
    avail_rows = []
    for split, a in stats["availability"].items():
        avail_rows.append(
            [
                split,
                a["clips"],
                _reasons(a.get("failed_download", {})),
                _reasons(
                    {
                        **{f"keyframes:{k}": v for k, v in a.get("failed_keyframes", {}).items()},
                        **{f"caption:{k}": v for k, v in a.get("failed_caption", {}).items()},
                        **{f"merge:{k}": v for k, v in a.get("failed_merge", {}).items()},
                        **({"media missing": a["media_missing"]} if a.get("media_missing") else {}),
                    }
                ),
                a["exported"],
            ]
        )
    stat_rows = []
    for split, entry in stats["splits"].items():
        for source, s in entry.items():
            stat_rows.append([split, source, s["captions"], f"{s['words_per_caption']:.2f}", s["vocabulary"]])
    unreviewed = stats["unreviewed_test_items"]
    avail_table = _table(
        [
            "split",
            "AudioCaps clips",
            "not downloadable (reason)",
            "later failures (stage:reason)",
            "exported",
        ],
        avail_rows,
    )
    revisions = ", ".join(prov["caption_revision"]) or "n/a"
    from_sources = {k: _counts(prov.get(f"{k}_sources", {})) for k in ("video", "audio")}
    configs_list = ", ".join(f"`{v}`" for v in stats["variants"])
    media = (
        "This private copy embeds the middle keyframe (`image`, datasets `Image`) and the 16 kHz audio "
        "(`audio`, datasets `Audio`) of each clip."
        if stats["embed_media"]
        else "Media is not embedded (YouTube content): `video_path`, `frame_path` and `audio_path` are "
        "paths relative to the run folder that built the export; rebuild the media with the builder."
    )
    flagged = (
        f"\n**{unreviewed} test clips are unreviewed**: their references are raw LLM merges "
        "(`review_verdict: unreviewed`). Do not report results on them as on reviewed references.\n"
        if unreviewed
        else ""
    )
    stale = stats.get("stale_items", 0)
    if stale:
        flagged += (
            f"\n**{stale} clips are stale** (`stale: true`): made with settings or from upstream results "
            "that changed since, and exported as they were. Rebuild them before reporting results.\n"
        )
    # Several annotators per clip: how much they agreed (review/policy.py says how it is measured).
    agreement = ""
    if reviewed and stats.get("review_agreement"):
        agreement = f"- {describe(stats['review_agreement'])}.\n"
    return f"""---
{meta}---

# {cfg.pretty_name}

Audio-visual captions for AudioCaps clips: captions that describe what is heard *and* what is
seen, for training and evaluating audio-visual captioning models without AudioCaps' bias toward
the audio stream (paper: *Listening without Looking: Modality Bias in Audio-Visual Captioning*).
{flagged}
## Configs and splits

One config per training variant of the paper (Sec. 4.1); they differ on `train` (and on
`validation` unless it was merged). Every config has the same `test` split: the reviewed merged
captions as references.

Default config: `{stats["default_variant"]}`. Configs in this export: {configs_list}.

- `random`: per clip, one of the two per-modality captions (audio or visual), chosen by a seeded
  RNG keyed by (seed, clip_id, caption index); seed = {stats["seed"]}. `caption_sources` says which.
- `concat`: both captions as two sentences, audio first.
- `and`: both joined into one sentence with "and" (the audio caption's final period dropped, the
  visual caption's first letter lowercased unless it starts with an acronym, "I", or a proper noun).
- `per_modality`: both captions kept as separate references (`captions`).

An empty visual caption leaves the audio caption alone in every variant.

```python
from datasets import load_dataset
ds = load_dataset("path/or/repo", "{stats["default_variant"]}")   # train / validation / test
ds["test"][0]["captions"]                                 # the references of one clip
```

Columns: `clip_id` (`<youtube_id>_<start_ms>_<end_ms>`), `youtube_id`, `start_time`, `end_time`
(seconds), `split`, `caption` (the first reference), `captions` (the references),
`caption_sources`, `audio_captions` (original AudioCaps), `audiocap_ids`, `visual_caption`,
`frame_captions`, `merged_captions` (raw LLM merges), `review_verdict` (accept / edited /
unreviewed on merged splits, null elsewhere), `variant`, `video_path`, `video_source` and
`audio_source` (where stage 1 took the picture and the sound: `kind:name` of the source), `frame_path`,
`frame_time_s`, `audio_path`, quality flags `flag_black_frame` / `flag_silent`, `stale` (true only in
an export asked to include stale clips), provenance
(`caption_model`, `caption_revision`, `merge_model`, `merge_backend`, `merge_prompt_hash`), and the
quality scores (see "Quality scores"): `visual_clip_score` (per frame caption),
`visual_caption_clip_score`, `merge_clap_score` and `merge_clip_score` (per merged caption),
`source_audio_clap_score` and `source_audio_clip_score` (per audio caption),
`source_visual_clap_score`, `source_visual_clip_score`, each with its `*_percentile` column,
`visual_caption_dropped`, and the scorers `clip_model`, `score_models`.
{media}

## Counts and availability

{_table(["split", "clips"], [[k, v] for k, v in stats["counts"].items()])}

Not every AudioCaps clip can still be fetched from YouTube; these clips are missing:

{avail_table}

## How it was built

With the AudioVisualCaps builder, stage by stage: the AudioCaps CSVs; the clips taken from the
media sources below (local copies first, YouTube for the rest); keyframes and 16 kHz mono audio
extracted; visual captions by an image captioner; for the merged splits, audio and visual captions
merged by an LLM, then reviewed by people in Label Studio.

- media sources (exported clips per source): picture: {from_sources["video"]}; sound: {from_sources["audio"]}
- caption model(s): {", ".join(prov["caption_model"]) or "n/a"} (revision {revisions})
- merge model(s): {", ".join(prov["merge_model"]) or "n/a"} via {", ".join(prov["merge_backend"]) or "n/a"}
- merge prompt hash(es): {", ".join(f"`{h}`" for h in prov["merge_prompt_hash"]) or "n/a"}
- review of the test merges: {reviewed} reviewed: {review.get("accept", 0)} accepted as is,
  {review.get("edited", 0)} edited, {review.get("rejected", 0)} rejected (excluded);
  {review.get("unreviewed", 0)} not reviewed{" (included, flagged)" if unreviewed else " (excluded)"}.
{agreement}
## Quality scores

{scores_section(stats)}
## Figures

{figures_section(figures or [])}
## Statistics (as in the paper's Table 2)

Tokenization: {stats["tokenization"]}.
On the full AudioCaps test CSV this rule gives 10.27 words per caption, the paper's figure (its
vocabulary figure, 1,319, uses a tokenizer the paper does not name). The table covers the clips in
this export.

{_table(["split", "captions", "#captions", "#words/caption", "#vocabulary"], stat_rows)}

## License

`license: other`. The audio captions are AudioCaps' and are free to use **for academic purposes
only**; the AudioCaps CSVs are MIT-licensed (see `LICENSE`). The clips are YouTube videos owned by
their uploaders and are not distributed here. Visual and merged captions were generated by the
models named above, under their own terms.

## Limitations

- Visual captions come from one or a few keyframes: motion and off-frame events are not seen.
- Merged captions are LLM outputs; unreviewed ones (if any, flagged) may hallucinate.
- Train references are not merged (as in the paper): the variants are rule-based joins.
- Availability shrinks over time as YouTube videos are removed; counts above are this export's.

## Citation

```bibtex
{PAPER_BIBTEX}

{AUDIOCAPS_BIBTEX}
```

Checksums of every file: `SHA256SUMS`. Machine-readable figures: `statistics.json`.
"""


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
    def fail(field: str, why: str) -> None:
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
