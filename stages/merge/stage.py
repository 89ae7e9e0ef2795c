"""Stage 4: merge each clip's audio caption(s) and visual caption into one caption with an LLM.

As in the paper, the test split is merged (``merge.splits``); each of its 5 AudioCaps captions is
merged with the BLIP-2 caption on its own (``mode: per_caption``, 5 references) or all 5 at once
(``mode: all_in_one``, one reference). The prompt is one versioned file
(``stages/merge/prompts/merge_v2.yaml``, few-shot examples for both forms included) whose sha256
goes on every row; older versions stay loadable (``merge.prompt_file``), so old rows keep their
meaning. The settings are :mod:`stages.merge.config`, the LLM backends :mod:`stages.merge.backends`.

``setup`` runs the backend's preflight: a server that is down, a rejected key, an unknown model or
a model folder that does not load stops the run (exit 2) before any item, consuming no attempt.
Every answer passes the quality gate (:mod:`stages.merge.gate`). An answer cut off at its token
budget (``finish_reason == "length"``) is asked again once with ``retry_max_new_tokens``; a failing
one is asked again with a new seed up to ``max_quality_retries`` times, then the clip is
``failed_permanent`` with reason ``gate_<check>``. An unreachable or overloaded server fails the
clip transiently (``llm_*``), so the runner retries it later. The raw answers and every check are
kept on the row for audit. ``dry_run`` (``avcaps run 4 --dry-run N``) prints the requests as sent
and the gate's verdicts, writing nothing.

Scores (``merge.score``, :mod:`stages.scoring`): each merge, each source audio caption and the
visual caption are scored against the clip's audio (CLAP) and middle keyframe (CLIP), both from
stage 2. With ``merge.min_clap_percentile`` set, a merge whose CLAP score ranks below that
percentile of the run's merge CLAP scores is asked again with a new seed, up to
``max_score_tries`` answers, and the best-scoring answer that passes the gate is kept
(AudioSetCaps' scheme; :meth:`MergeStage._keep_best` defines the population).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import ItemError, PermanentError, TransientError
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.keyframes import middle_index
from stages.merge.backends import Backend, ChatRequest, make_backend
from stages.merge.config import MergeConfig, gate_settings
from stages.merge.gate import GATE_VERSION, GateSettings, Verdict, check_answer
from stages.merge.prompt import DEFAULT_PROMPT, Prompt
from stages.scores import (
    MERGE_CLAP,
    MERGE_CLIP,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
    merge_score_fields,
)
from stages.scoring import ClapScorer, ClipScorer, ScoreError, ScorerSpec, cosine

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pandas as pd
    import pyarrow as pa

RAW_KEEP = 2000  # characters of each failed try kept in merge_checks


@dataclass
class _Job:
    """One merge to make: a clip's audio caption(s) with its visual caption."""

    clip: int
    audio: list[str]
    visual: str
    messages: list[dict[str, str]]
    max_tokens: int
    k: int = 0  # quality retries used: the next request's seed is merge.seed + k
    tries: list[dict[str, Any]] = field(default_factory=list)
    verdict: Verdict | None = None
    raw: str = ""
    error: ItemError | None = None
    tokens: tuple[int, int] = (0, 0)
    clap: float | None = None  # CLAP score of the kept answer
    score_tries: int = 1  # answers the CLAP rule asked for (the first included)


class MergeStage(ItemStage[MergeConfig]):
    number: ClassVar[int] = 4
    name: ClassVar[str] = "merge"
    upstream: ClassVar[str | None] = "caption"
    description: ClassVar[str] = "LLM merge of the audio and visual captions, with a quality gate"
    resources: ClassVar[Resources] = Resources(cpus=1.0)

    backend: Backend | None = None
    clap: ClapScorer | None = None
    clip: ClipScorer | None = None
    loader: ThreadPoolExecutor | None = None

    def fingerprint_settings(self) -> dict[str, Any]:
        # What decides the merged text: the model and how it is asked (prompt, decoding) and what
        # the gate lets through; not where it is served from, how many requests fly, or timeouts.
        cfg = self.cfg
        keys = ("mode", "backend", "model", "reasoning_effort", "structured_output", "max_new_tokens")
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
        return {**out, "prompt": self.prompt.sha256, "gate": GATE_VERSION, "scores": self.score_settings()}

    def score_settings(self) -> dict[str, Any] | None:
        """The scorers and the CLAP rule: another model changes the scores, the rule the merges."""
        cfg = self.cfg
        if not cfg.score:
            return None
        out: dict[str, Any] = {"clap": self.clap_spec().ident(), "clip": self.clip_spec().ident()}
        if cfg.min_clap_percentile is not None:
            out |= {
                "min_clap_percentile": cfg.min_clap_percentile,
                "max_score_tries": cfg.max_score_tries,
                "score_min_population": cfg.score_min_population,
            }
        return out

    def clap_spec(self) -> ScorerSpec:
        cfg = self.cfg
        return ScorerSpec(
            cfg.clap_model,
            cfg.clap_revision,
            cfg.score_device,
            cfg.score_dtype,
            cfg.score_batch_size,
            cfg.score_local_files_only,
        )

    def clip_spec(self) -> ScorerSpec:
        cfg = self.cfg
        return ScorerSpec(
            cfg.clip_model,
            cfg.clip_revision,
            cfg.score_device,
            cfg.score_dtype,
            cfg.score_batch_size,
            cfg.score_local_files_only,
        )

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
        """The ledger and stats only: this stage reads no media and writes none, so its media may sit on
        a full or read-only disk (copied to a GPU box, say)."""
        return [d for d in super().write_dirs() if d != self.ctx.tmp_dir]

    def setup(self) -> None:
        _ = self.prompt  # a broken prompt file aborts before any model loads
        self.backend = make_backend(self.cfg)
        try:
            self.backend.preflight()  # no item is tried against a backend that cannot answer
            if self.cfg.score:
                from concurrent.futures import ThreadPoolExecutor

                self.loader = ThreadPoolExecutor(4, thread_name_prefix="merge-score-load")
                self.clap = ClapScorer(self.clap_spec(), pool=self.loader)
                self.clip = ClipScorer(self.clip_spec(), pool=self.loader)
                self.population = self._committed_clap_scores()
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        self.clap = self.clip = None
        if self.loader is not None:
            self.loader.shutdown(wait=True, cancel_futures=True)
            self.loader = None

    def _committed_clap_scores(self) -> list[float]:
        """The merge CLAP scores of the run's current ok rows made with this CLAP model."""
        import pyarrow.compute as pc

        from pipeline.selection import stage_ledger

        ledger = stage_ledger(type(self), self.ctx.workdir)
        if not ledger.exists():
            return []
        table = ledger.latest_table(["status", MERGE_CLAP, "score_models"])
        table = table.filter(pc.equal(table["status"], "ok"))
        assert self.clap is not None
        mine = [
            bool(m) and json.loads(m).get("clap") == self.clap.ident
            for m in table["score_models"].to_pylist()
        ]
        values = pc.list_flatten(table.filter(mine)[MERGE_CLAP]).to_pylist()
        return [float(v) for v in values if v is not None]

    def _jobs(self, idx: int, item: Item) -> list[_Job]:
        audio = item.data.get("audio_captions")
        visual = item.data.get("visual_caption")
        if (
            not isinstance(audio, list)
            or not audio
            or not all(isinstance(a, str) and a.strip() for a in audio)
        ):
            msg = f"{item.clip_id}: audio_captions must be non-empty strings: {audio!r}"
            raise PermanentError("bad_input", msg)
        if not isinstance(visual, str) or not visual.strip():
            raise PermanentError("bad_input", f"{item.clip_id}: visual_caption is empty: {visual!r}")
        groups = [[a] for a in audio] if self.cfg.mode == "per_caption" else [audio]
        return [
            _Job(idx, g, visual, self.prompt.messages(g, visual, self.cfg.max_words), self.cfg.max_new_tokens)
            for g in groups
        ]

    def _request(self, job: _Job) -> ChatRequest:
        return ChatRequest(job.messages, self.cfg.seed + job.k, job.max_tokens)

    def process(self, batch: list[Item]) -> list[Result]:
        assert self.backend is not None, "setup() was not called"
        results: dict[int, Result] = {}
        jobs: list[_Job] = []
        for i, item in enumerate(batch):
            try:
                jobs += self._jobs(i, item)
            except ItemError as exc:
                results[i] = Result.failed(item.clip_id, exc)
        self._ask(jobs)
        by_clip: dict[int, list[_Job]] = {}
        for job in jobs:
            by_clip.setdefault(job.clip, []).append(job)
        scores: dict[int, dict[str, Any] | ItemError] = {}
        if self.clap is not None:
            import torch

            try:
                scores = self._score(batch, by_clip)
            except torch.OutOfMemoryError as exc:
                err = TransientError("cuda_oom", f"CUDA out of memory in CLAP/CLIP scoring: {exc}")
                return [Result.failed(item.clip_id, err) for item in batch]
        for i, clip_jobs in by_clip.items():
            results[i] = self._result(batch[i], clip_jobs, scores.get(i))
        return [results[i] for i in range(len(batch))]

    def _ask(self, todo: list[_Job]) -> None:
        """Ask the backend for every job, with a bigger budget for a cut-off answer (once) and a
        new seed for one failing the gate (``max_quality_retries``)."""
        assert self.backend is not None
        while todo:
            requests = [self._request(j) for j in todo]
            answers = self.backend.generate(requests)
            again = []
            for job, req, ans in zip(todo, requests, answers, strict=True):
                sent = {"seed": req.seed, "max_tokens": req.max_tokens}
                if isinstance(ans, ItemError):
                    job.error = ans
                    job.tries.append({**sent, "error": f"{ans.reason}: {ans.message}"[:RAW_KEEP]})
                    continue
                v = check_answer(ans.text, job.audio, job.visual, self.gate, ans.finish_reason)
                job.verdict, job.raw = v, ans.text
                job.tokens = (job.tokens[0] + ans.prompt_tokens, job.tokens[1] + ans.completion_tokens)
                job.tries.append({**sent, **v.as_dict(), "raw": ans.text[:RAW_KEEP]})
                if v.reason == "truncated" and job.max_tokens < self.cfg.retry_budget:
                    job.max_tokens = self.cfg.retry_budget  # once: same seed, a larger budget
                    again.append(job)
                elif not v.ok and job.k < self.cfg.max_quality_retries:
                    job.k += 1
                    again.append(job)
            todo = again

    def _media(
        self, batch: list[Item], clips: list[int]
    ) -> dict[int, tuple[np.ndarray, np.ndarray] | ScoreError]:
        """(CLAP audio embedding, CLIP embedding of the middle keyframe) of each clip, from
        stage 2's ``audio_path`` and ``frame_paths[middle_frame]``, or why there is none."""
        assert self.clap is not None and self.clip is not None
        out: dict[int, tuple[np.ndarray, np.ndarray] | ScoreError] = {}
        audio: dict[int, Path] = {}
        image: dict[int, Path] = {}
        for i in clips:
            data = batch[i].data
            frames = data.get("frame_paths") or []
            if not data.get("audio_path") or not frames:
                out[i] = ScoreError("score_no_media", "stage 2 gave no audio_path or no frame_paths")
                continue
            k = middle_index(len(frames), data.get("middle_frame")) or 0
            audio[i] = self.ctx.workdir / data["audio_path"]
            image[i] = self.ctx.workdir / frames[k]
        audio_emb = self.clap.audio_embeds(audio.values())
        image_emb = self.clip.image_embeds(image.values())
        for i in audio:
            a, v = audio_emb[audio[i]], image_emb[image[i]]
            bad = a if isinstance(a, ScoreError) else v if isinstance(v, ScoreError) else None
            out[i] = bad or (a, v)  # type: ignore[assignment]
        return out

    def _score(
        self, batch: list[Item], by_clip: dict[int, list[_Job]]
    ) -> dict[int, dict[str, Any] | ItemError]:
        """The score columns of each clip (or the error that left it unscored); with the CLAP rule
        on, low-scoring merges are asked again first (:meth:`_keep_best`)."""
        assert self.clap is not None and self.clip is not None
        media = self._media(batch, list(by_clip))
        answered = [
            j
            for jobs in by_clip.values()
            for j in jobs
            if j.verdict and j.verdict.ok and j.error is None and isinstance(media[j.clip], tuple)
        ]
        first = self.clap.text_embeds(j.verdict.caption for j in answered)  # type: ignore[union-attr]
        for j in answered:
            j.clap = cosine(media[j.clip][0], first[j.verdict.caption])  # type: ignore[index,union-attr]
            j.tries[-1]["clap_score"] = j.clap
        if self.cfg.min_clap_percentile is not None:
            self._keep_best(answered, media)
            self.population += [j.clap for j in answered if j.clap is not None]

        texts: list[str] = []
        for jobs in by_clip.values():
            texts += [j.verdict.caption for j in jobs if j.verdict and j.verdict.ok]
            texts += [*batch[jobs[0].clip].data["audio_captions"], batch[jobs[0].clip].data["visual_caption"]]
        clap_t, clip_t = self.clap.text_embeds(texts), self.clip.text_embeds(texts)
        models = json.dumps({"clap": self.clap.ident, "clip": self.clip.ident})
        out: dict[int, dict[str, Any] | ItemError] = {}
        for i, jobs in by_clip.items():
            m = media[i]
            if isinstance(m, ScoreError):
                msg = f"{batch[i].clip_id}: cannot score the merge: {m.message}"
                out[i] = PermanentError(m.reason, msg)
                continue
            a, v = m
            merged = [j.verdict.caption if j.verdict and j.verdict.ok else None for j in jobs]
            sources = batch[i].data["audio_captions"]
            visual = batch[i].data["visual_caption"]
            out[i] = {
                MERGE_CLAP: [cosine(a, clap_t[c]) if c else None for c in merged],
                MERGE_CLIP: [cosine(v, clip_t[c]) if c else None for c in merged],
                SOURCE_AUDIO_CLAP: [cosine(a, clap_t[c]) for c in sources],
                SOURCE_AUDIO_CLIP: [cosine(v, clip_t[c]) for c in sources],
                SOURCE_VISUAL_CLAP: cosine(a, clap_t[visual]),
                SOURCE_VISUAL_CLIP: cosine(v, clip_t[visual]),
                "merge_score_tries": max(j.score_tries for j in jobs),
                "score_models": models,
            }
        return out

    def _keep_best(self, answered: list[_Job], media: dict[int, Any]) -> None:
        """The CLAP rule: a merge scoring below ``min_clap_percentile`` is asked again with a new
        seed (one try each, no gate retries) until an answer passes the gate and ranks at or above
        the percentile, or ``max_score_tries`` answers were asked; the best-scoring one is kept.

        The population a score is ranked in: the merge CLAP scores of the run's current ok rows
        made with the same CLAP model (read when the worker starts), those this worker made since,
        and the first answers of this batch. Raw cosines mean nothing across models, and no fixed
        reference exists for a new model; the run's own scores are what the percentiles published
        on the rows refer to (:func:`stages.scores.percentile_ranks`). Below
        ``score_min_population`` scores the rule does not fire: a percentile of a handful of
        values is noise. A rerun in another order can therefore decide differently near the
        threshold; ``merge_score_tries`` and ``merge_checks`` record what was decided.
        """
        import numpy as np

        cfg = self.cfg
        assert self.backend is not None and self.clap is not None and cfg.min_clap_percentile is not None
        pop = np.sort(np.asarray(self.population + [j.clap for j in answered], dtype="float64"))
        if len(pop) < cfg.score_min_population:
            return

        def low(j: _Job) -> bool:
            rank = 100.0 * np.searchsorted(pop, j.clap, side="right") / len(pop)
            return bool(rank < cfg.min_clap_percentile)

        todo = [j for j in answered if low(j)]
        while todo := [j for j in todo if j.score_tries < cfg.max_score_tries and low(j)]:
            for j in todo:
                j.k += 1  # a seed no earlier try of this merge used
                j.score_tries += 1
            requests = [ChatRequest(j.messages, cfg.seed + j.k, cfg.max_new_tokens) for j in todo]
            answers = self.backend.generate(requests)
            passed = []
            for j, req, ans in zip(todo, requests, answers, strict=True):
                sent = {"seed": req.seed, "max_tokens": req.max_tokens, "score_retry": True}
                if isinstance(ans, ItemError):  # the kept answer stands
                    j.tries.append({**sent, "error": f"{ans.reason}: {ans.message}"[:RAW_KEEP]})
                    continue
                v = check_answer(ans.text, j.audio, j.visual, self.gate, ans.finish_reason)
                j.tokens = (j.tokens[0] + ans.prompt_tokens, j.tokens[1] + ans.completion_tokens)
                j.tries.append({**sent, **v.as_dict(), "raw": ans.text[:RAW_KEEP]})
                if v.ok:
                    passed.append((j, v, ans.text))
            emb = self.clap.text_embeds(v.caption for _, v, _ in passed)
            for j, v, text in passed:
                score = cosine(media[j.clip][0], emb[v.caption])
                j.tries[-1]["clap_score"] = score
                if j.clap is None or score > j.clap:
                    j.clap, j.verdict, j.raw = score, v, text

    def _result(
        self, item: Item, jobs: list[_Job], scores: dict[str, Any] | ItemError | None = None
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
        if isinstance(scores, ItemError):  # merged, but the scorers could not read the clip's media
            return Result.failed(item.clip_id, scores, **outputs)
        return Result.ok(item.clip_id, **outputs)

    def dry_run(self, batch: list[Item]) -> Iterator[str]:
        """Each merge of ``batch``: the request exactly as the backend sends it, the answer, and
        the gate's verdict with its figures. One try per merge (the seed a run tries first), no
        retries, nothing written: how a user tunes the prompt and the gate."""
        assert self.backend is not None, "setup() was not called"
        for item in batch:
            try:
                jobs = self._jobs(0, item)
            except ItemError as exc:
                yield f"=== {item.clip_id}: {exc.reason}: {exc.message}\n"
                continue
            requests = [self._request(j) for j in jobs]
            answers = self.backend.generate(requests)
            for n, (job, req, ans) in enumerate(zip(jobs, requests, answers, strict=True), 1):
                head = f"=== {item.clip_id} merge {n}/{len(jobs)}"
                out = [f"{head} ({self.prompt.version}, {self.backend.name})", "--- request"]
                out.append(self.backend.request_text(req))
                if isinstance(ans, ItemError):
                    out += ["--- error", f"{ans.status} {ans.reason}: {ans.message}"]
                else:
                    v = check_answer(ans.text, job.audio, job.visual, self.gate, ans.finish_reason)
                    figures = v.as_dict()
                    for key in ("ok", "reason", "caption"):
                        figures.pop(key)
                    out += [
                        f"--- answer (finish_reason {ans.finish_reason}, "
                        f"{ans.prompt_tokens} prompt + {ans.completion_tokens} completion tokens)",
                        ans.text,
                        f"--- gate: {'ok' if v.ok else 'gate_' + v.reason}: {v.caption!r}",
                        json.dumps(figures, ensure_ascii=False),
                    ]
                yield "\n".join(out) + "\n"

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
