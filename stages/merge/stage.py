"""Stage 4: merge each clip's audio caption(s) and visual caption into one caption with an LLM.

As in the paper, the test split is merged (``merge.splits``); each of its 5 AudioCaps captions is
merged with the BLIP-2 caption on its own (``mode: per_caption``, 5 references) or all 5 at once
(``mode: all_in_one``, one reference). The prompt is one versioned file
(``stages/merge/prompts/merge_v2.yaml``, few-shot examples for both forms included, read by
:mod:`stages.merge.prompt`) whose sha256 goes on every row; older versions stay loadable
(``merge.prompt_file``), so old rows keep their meaning. The settings are
:mod:`stages.merge.config`, the LLM backends :mod:`stages.merge.backends`.

``setup`` runs the backend's preflight: a server that is down, a rejected key, an unknown model or
a model folder that does not load stops the run (exit 2) before any item, consuming no attempt.
Every answer passes the quality gate (:mod:`stages.merge.gate`; the asking is
:mod:`stages.merge.jobs`). An answer cut off at its token budget (``finish_reason == "length"``)
is asked again once with ``retry_max_new_tokens``; a failing one is asked again with a new seed up
to ``max_quality_retries`` times, then the clip is ``failed_permanent`` with reason
``gate_<check>``. An unreachable or overloaded server fails the clip transiently (``llm_*``), so
the runner retries it later. The raw answers and every check are kept on the row for audit.
``dry_run`` (``avcaps run 4 --dry-run N``, :mod:`stages.merge.dry_run`) prints the requests as
sent and the gate's verdicts, writing nothing.

Scores (``merge.score``, :mod:`stages.merge.score`): each merge, each source audio caption and the
visual caption are scored against the clip's audio (CLAP) and middle keyframe (CLIP), both from
stage 2. With ``merge.min_clap_percentile`` set, a merge whose CLAP score ranks below that
percentile of the run's merge CLAP scores is asked again with a new seed, up to
``max_score_tries`` answers, and the best-scoring answer that passes the gate is kept
(AudioSetCaps' scheme; :meth:`stages.merge.score.MergeScoring.keep_best` defines the population).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import ItemError, PermanentError, TransientError
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.merge.backends import Backend, make_backend
from stages.merge.config import MergeConfig, gate_settings
from stages.merge.dry_run import preview
from stages.merge.gate import GATE_VERSION, GateSettings
from stages.merge.jobs import Job, ask, jobs_for
from stages.merge.prompt import DEFAULT_PROMPT, Prompt
from stages.merge.score import MergeScoring, legacy_score_settings, rule_settings
from stages.scores import MERGE_SCORE_COLUMNS, merge_score_fields
from stages.scoring import ScoringConfig, model_ident

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa


class MergeStage(ItemStage[MergeConfig]):
    number: ClassVar[int] = 4
    name: ClassVar[str] = "merge"
    upstream: ClassVar[str | None] = "caption"
    description: ClassVar[str] = "LLM merge of the audio and visual captions, with a quality gate"
    resources: ClassVar[Resources] = Resources(cpus=1.0)

    uses = (ScoringConfig,)  # the CLAP and CLIP scorers (scoring: section), shared with stage 3
    layer_columns = MERGE_SCORE_COLUMNS
    layer_name = "scores"

    backend: Backend | None = None
    scoring: MergeScoring | None = None  # with merge.score: the scorers, loaded at setup

    def fingerprint_settings(self) -> dict[str, Any]:
        # What decides the merged text: the model and how it is asked (prompt, decoding) and what
        # the gate lets through; not where it is served from, how many requests fly, or timeouts.
        cfg = self.cfg
        keys: tuple[str, ...] = (
            "mode",
            "backend",
            "model",
            "reasoning_effort",
            "structured_output",
            "max_new_tokens",
        )
        keys += (
            "retry_max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "max_words",
            "max_chars",
            "min_words",
        )
        keys += ("min_audio_overlap", "min_visual_overlap", "max_invented", "max_quality_retries")
        out = {k: getattr(cfg, k) for k in keys}
        # A local model by its files, however its path is spelled (relative, absolute, a link).
        out["model"] = model_ident(cfg.model) if Path(cfg.model).expanduser().is_dir() else cfg.model
        # The scorers are the layer; only the CLAP rule, which picks answers by score, is here.
        rule = rule_settings(cfg, self.section(ScoringConfig))
        return {**out, "prompt": self.prompt.sha256, "gate": GATE_VERSION, "clap_rule": rule}

    def legacy_fingerprint_settings(self) -> list[dict[str, Any]]:
        # Before scores were a layer: the model by name and both scorers in the row's fingerprint.
        out = {**self.fingerprint_settings(), "model": self.cfg.model}
        del out["clap_rule"]
        return [{**out, "scores": legacy_score_settings(self.cfg, self.section(ScoringConfig))}]

    def reads(self) -> tuple[str, ...]:
        # The captions it merges; with the CLAP rule on, also the media the rule scores against.
        media = (
            ("audio_path", "frame_paths", "middle_frame") if self.cfg.min_clap_percentile is not None else ()
        )
        return ("audio_captions", "visual_caption", *media)

    def layer_settings(self) -> dict[str, Any] | None:
        if not self.cfg.score:
            return None
        scoring = self.section(ScoringConfig)
        return {"clap": scoring.clap().ident(), "clip": scoring.clip().ident()}

    def layer_reads(self) -> tuple[str, ...]:
        # The scores compare the merges with the clip's audio and middle keyframe.
        return ("audio_path", "frame_paths", "middle_frame") if self.cfg.score else ()

    @cached_property
    def prompt(self) -> Prompt:
        return Prompt.load(self.cfg.prompt_file or DEFAULT_PROMPT)

    @cached_property
    def gate(self) -> GateSettings:
        return gate_settings(self.cfg)

    @classmethod
    def output_schema(cls) -> list[pa.Field]:
        import pyarrow as pa

        return [
            pa.field("merged_captions", pa.list_(pa.string())),
            pa.field("merge_mode", pa.string()),
            pa.field("merge_raw", pa.list_(pa.string())),
            pa.field("merge_prompt_hash", pa.string()),
            pa.field("merge_backend", pa.string()),
            pa.field("merge_model", pa.string()),
            pa.field("merge_checks", pa.string()),
            *merge_score_fields(),
        ]

    selection_columns = ("split",)

    def select(self, table: pd.DataFrame) -> Any:
        return table["split"].isin(self.cfg.splits)

    def write_dirs(self) -> list[Path]:
        """The ledger and stats only: this stage writes no media (it reads stage 2's to score), so its
        media may sit on a full or read-only disk (copied to a GPU box, say)."""
        return [d for d in super().write_dirs() if d != self.ctx.tmp_dir]

    def setup(self) -> None:
        _ = self.prompt  # a broken prompt file aborts before any model loads
        try:
            # A run that only re-scores (another scorer) asks no LLM: none is started or checked.
            if "process" in self.work:
                self.backend = make_backend(self.cfg)
                self.backend.preflight()  # no item is tried against a backend that cannot answer
            if self.cfg.score:
                from pipeline.selection import stage_ledger

                ledger = stage_ledger(type(self), self.ctx.workdir)
                self.scoring = MergeScoring(self.cfg, self.section(ScoringConfig), self.ctx.workdir, ledger)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self.scoring is not None:
            self.scoring.close()
            self.scoring = None

    def process(self, batch: list[Item]) -> list[Result]:
        assert self.backend is not None, "setup() was not called"
        results: dict[int, Result] = {}
        jobs: list[Job] = []
        for i, item in enumerate(batch):
            try:
                jobs += jobs_for(i, item, self.prompt, self.cfg)
            except ItemError as exc:
                results[i] = Result.failed(item.clip_id, exc)
        ask(self.backend, jobs, self.gate, self.cfg)
        by_clip: dict[int, list[Job]] = {}
        for job in jobs:
            by_clip.setdefault(job.clip, []).append(job)
        scores: dict[int, dict[str, Any] | ItemError] = {}
        if self.scoring is not None:
            import torch

            try:
                scores = self.scoring.score(batch, by_clip, self.backend, self.gate)
            except torch.OutOfMemoryError as exc:
                # The merges stand; their scores are left to the next run (the layer).
                oom = TransientError("cuda_oom", f"CUDA out of memory in CLAP/CLIP scoring: {exc}")
                scores = dict.fromkeys(by_clip, oom)
        for i, clip_jobs in by_clip.items():
            results[i] = self._result(batch[i], clip_jobs, scores.get(i))
        return [results[i] for i in range(len(batch))]

    def refresh(self, batch: list[Item]) -> list[Result]:
        """New scores for rows whose merges are current (another scorer, or scores not made):
        no LLM is asked; the merges, raw answers and checks stay as they are."""
        import torch

        assert self.scoring is not None, "refresh needs merge.score"
        results = []
        try:
            scores = self.scoring.rescore(batch)
        except torch.OutOfMemoryError as exc:
            oom = TransientError("cuda_oom", f"CUDA out of memory in CLAP/CLIP scoring: {exc}")
            scores = dict.fromkeys(range(len(batch)), oom)
        for i, item in enumerate(batch):
            prev = {
                k: v
                for k, v in (item.previous or {}).items()
                if k not in ("fingerprint", "layer_fingerprint")
            }
            got = scores.get(i)
            if isinstance(got, dict):
                results.append(Result.ok(item.clip_id, **{**prev, **got}))
            else:
                r = Result.ok(item.clip_id, **prev)
                r.layer, r.message = False, f"scores not made: {got}"[:500]
                results.append(r)
        return results

    def _result(
        self, item: Item, jobs: list[Job], scores: dict[str, Any] | ItemError | None = None
    ) -> Result:
        assert self.backend is not None
        checks = {
            "prompt_version": self.prompt.version,
            "gate_version": GATE_VERSION,
            "gate": asdict(self.gate),
            "merges": [
                {
                    "audio": j.audio,
                    "ok": bool(j.verdict and j.verdict.ok and j.error is None),
                    "n_tries": len(j.tries),
                    "prompt_tokens": j.tokens[0],
                    "completion_tokens": j.tokens[1],
                    "clap_score": j.clap,
                    "score_tries": j.score_tries,
                    "tries": j.tries,
                }
                for j in jobs
            ],
        }
        outputs = {
            "merged_captions": [j.verdict.caption if j.verdict and j.verdict.ok else None for j in jobs],
            "merge_mode": self.cfg.mode,
            "merge_raw": [j.raw for j in jobs],
            "merge_prompt_hash": self.prompt.sha256,
            "merge_backend": self.backend.name,
            "merge_model": self.backend.model,
            "merge_checks": json.dumps(checks, ensure_ascii=False),
        }
        if isinstance(scores, dict):
            outputs |= scores
        errors = [j.error for j in jobs if j.error is not None]
        transient = [e for e in errors if isinstance(e, TransientError)]
        if transient or errors:
            err = (transient or errors)[0]
            return Result.failed(item.clip_id, err, **outputs)
        bad = [(n, j) for n, j in enumerate(jobs) if not (j.verdict and j.verdict.ok)]
        if bad:
            n, j = bad[0]
            reason = j.verdict.reason if j.verdict else "no_answer"
            msg = (
                f"{item.clip_id}: merge {n + 1}/{len(jobs)} failed the gate ({reason}) "
                f"after {len(j.tries)} tries; last answer: {j.raw[:200]!r}"
            )
            return Result.failed(item.clip_id, PermanentError(f"gate_{reason}", msg), **outputs)
        result = Result.ok(item.clip_id, **outputs)
        if isinstance(scores, ItemError):  # merged; the scores are left to the next run
            result.layer, result.message = False, f"scores not made: {scores}"[:500]
        return result

    def dry_run(self, batch: list[Item]) -> Iterator[str]:
        """Each merge of ``batch``: the request exactly as the backend sends it, the answer, and
        the gate's verdict with its figures. One try per merge (the seed a run tries first), no
        retries, nothing written: how a user tunes the prompt and the gate."""
        assert self.backend is not None, "setup() was not called"
        yield from preview(batch, self.prompt, self.cfg, self.backend, self.gate)

    def extra_stats(self, state: pd.DataFrame) -> dict[str, Any]:
        if state.empty or "merge_checks" not in state.columns:
            return {}
        tries = tokens_in = tokens_out = merges = 0
        for text in state.loc[state["status"] == "ok", "merge_checks"].dropna():
            for m in json.loads(text).get("merges", []):
                merges += 1
                tries += m["n_tries"]
                tokens_in += m["prompt_tokens"]
                tokens_out += m["completion_tokens"]
        return {
            "merges_ok": merges,
            "mean_tries_per_merge": round(tries / merges, 3) if merges else None,
            "prompt_tokens": tokens_in,
            "completion_tokens": tokens_out,
        }
