"""Stage 6: export AudioVisualCaps as Parquet in the Hugging Face ``datasets`` layout.

Reads the run folder (the clip table, the ledgers of stages 1-5 through their stage classes, whose
``output_schema()`` is the column contract, and ``05-review/reviews.parquet``) and writes
``DIR/export/``:

```
data/<config>/<split>-NNNNN-of-NNNNN.parquet   one config per training variant (random, concat,
                                              and, per_modality); every config has the same test
README.md                                     the dataset card (YAML ``configs:`` block first)
statistics.json                               counts, availability, review figures, Table-2 stats
LICENSE                                       the AudioCaps licence and the terms of this export
SHA256SUMS                                    sha256sum of every other file
```

The export is a pure function of the run folder and the config: rows are sorted by ``clip_id``,
Parquet files carry no timestamps and no pandas metadata, and the card has no dates, so two
exports of the same run are byte-identical. It is written to a temporary folder and swapped in
whole: a crash never leaves a half-written export behind.

This module is the stage; the work is done beside it, in the order the stage calls it:
:mod:`~stages.export.tables` reads the run folder, :mod:`~stages.export.plan` decides which clips
are exported (and why the others are not), :mod:`~stages.export.rows` builds their rows (with
:mod:`~stages.export.variants`, the training variants, and :mod:`~stages.export.scores`),
:mod:`~stages.export.write` writes the shards, checksums and licence and swaps the folder in,
:mod:`~stages.export.statistics` computes ``statistics.json`` (with
:mod:`~stages.export.caption_stats`, the Table-2 figures), and :mod:`~stages.export.card` renders
and validates the card. The settings are :mod:`~stages.export.config`.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from typing import Any

from pipeline.errors import AbortRun
from pipeline.io import atomic_path
from pipeline.selection import expected_table, stale_ids, to_python
from pipeline.stage import RunOptions, WholeStage
from stages.caption.config import CaptionConfig
from stages.export.config import ExportConfig
from stages.export.plan import HF_SPLITS, Plan, plan_export
from stages.export.rows import export_rows, row_schema
from stages.export.statistics import export_statistics
from stages.export.tables import CAPTION, DOWNLOAD, KEYFRAMES, MERGE, REVIEW, RunTables
from stages.export.write import swap_in, write_checksums, write_configs, write_documents
from stages.manifest import ManifestConfig
from stages.review.connection import PROJECT_FILE
from stages.review.pull import agreement_figures, pull

# Names the tests and other code import from here (the stage's module), beside the stage.
__all__ = ["HF_SPLITS", "ExportStage", "RunTables", "plan_export", "row_schema"]
log = logging.getLogger("avcaps")
INPUTS_FILE = "exported.parquet"  # in DIR/06-export: what each exported clip was made from


class ExportStage(WholeStage[ExportConfig]):
    # The frame whose caption is the clip's visual caption (caption.caption_frame); the CSVs'
    # folder, for the AudioCaps licence (manifest.csv_dir).
    uses = (CaptionConfig, ManifestConfig)
    number = 6
    name = "export"
    upstream = "review"
    description = "Write the dataset: Parquet configs per training variant, card, statistics, checksums."

    def _pull_reviews(self) -> None:
        """The reviews are pulled as part of the export, so it never ships stale references."""
        try:
            report = pull(self.ctx)
        except AbortRun as exc:
            raise AbortRun(
                f"{exc} (set export.pull_reviews=false to export the reviews pulled last)"
            ) from exc
        for line in report.lines():
            log.info("review pull: %s", line)

    def _record_inputs(self, tables: RunTables, plan: Plan) -> None:
        """What each exported clip was made from (the fingerprint of the last stage it went
        through), so ``avcaps status`` can tell how many exported clips are stale since."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = []
        for split, ids in plan.ids.items():
            stage = MERGE if split in plan.merged_splits else CAPTION
            df = tables.stages[stage]
            for cid in ids:
                fp = to_python(df.at[cid, "fingerprint"]) if df is not None and cid in df.index else None
                rows.append({"clip_id": cid, "stage": stage.dirname(), "fingerprint": fp})
        schema = pa.schema([("clip_id", pa.string()), ("stage", pa.string()), ("fingerprint", pa.string())])
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / INPUTS_FILE) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)

    def stale_count(self) -> int | None:
        """Exported clips whose last stage's row would be made differently now (settings or
        upstream results changed since the export)."""
        import pyarrow.parquet as pq

        path = self.folder / INPUTS_FILE
        if not path.exists():
            return None
        from pipeline.fingerprint import is_legacy

        exported = pq.read_table(path).to_pylist()
        expected: dict[str, dict[str, tuple[str, str]]] = {}
        for stage in {r["stage"] for r in exported}:
            cls = MERGE if stage == MERGE.dirname() else CAPTION
            try:
                table = expected_table(cls, self.ctx).to_pydict()
            except AbortRun:
                table = {"clip_id": [], "expected": [], "legacy": []}
            pairs = zip(table["expected"], table["legacy"], strict=True)
            expected[stage] = dict(zip(table["clip_id"], pairs, strict=True))

        def stale(r: dict[str, Any]) -> bool:
            fp = r["fingerprint"]
            if fp is None:
                return False
            now = expected[r["stage"]].get(r["clip_id"])
            return now is None or fp != now[1 if is_legacy(fp) else 0]

        # And a clip whose row in a stage it went through is stale (its merge may be current while
        # the captions it was made from are not: the merge waits, the export's captions are stale).
        through = set().union(*(stale_ids(s, self.ctx) for s in (DOWNLOAD, KEYFRAMES, CAPTION, MERGE)))
        return sum(1 for r in exported if stale(r) or r["clip_id"] in through)

    def run(self, options: RunOptions) -> dict[str, Any]:
        cfg = self.cfg
        workdir = self.ctx.workdir
        if cfg.pull_reviews and (self.ctx.stage_dir(REVIEW) / PROJECT_FILE).exists():
            self._pull_reviews()
        tables = RunTables.read(workdir, self.ctx)
        plan = plan_export(tables, cfg.allow_unreviewed, cfg.include_stale)
        caption_frame = self.section(CaptionConfig).caption_frame
        rows = export_rows(tables, plan, cfg, caption_frame, workdir)
        dest = workdir / cfg.folder
        tmp = workdir / f".tmp-export-{uuid.uuid4().hex[:8]}"
        try:
            schema = row_schema(cfg.embed_media)
            files = write_configs(rows.by_variant, tmp, schema, cfg.max_shard_bytes, workdir, cfg.embed_media)
            statistics = export_statistics(cfg, tables, plan, rows, files, agreement_figures(workdir))
            licence = self.section(ManifestConfig).csv_dir / "LICENSE"
            write_documents(tmp, statistics, cfg, licence, rows.exported, set(plan.merged_splits))
            write_checksums(tmp)
            swap_in(tmp, dest)
            self._record_inputs(tables, plan)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        counts = statistics["counts"]
        flagged = statistics["unreviewed_test_items"]
        return {
            "message": f"exported {sum(counts.values())} clips ("
            + ", ".join(f"{s} {n}" for s, n in counts.items())
            + f") x {len(cfg.variants)} configs to {dest}"
            + (f"; {flagged} unreviewed test clips flagged" if flagged else ""),
            "folder": str(dest),
            "counts": counts,
            "review": plan.review,
            "unreviewed_test_items": flagged,
            "excluded_media_missing": len(rows.excluded),
            "statistics": statistics["splits"],
        }
