"""Stage 4's scores (``merge.score``) and the keep-the-best CLAP rule (``merge.min_clap_percentile``).

Each merge, each source audio caption and the visual caption are scored against the clip's audio
(CLAP) and middle keyframe (CLIP), both from stage 2, with the scorers of :mod:`stages.scoring`;
the columns are :mod:`stages.scores`'. With the CLAP rule on, a merge whose CLAP score ranks below
that percentile of the run's merge CLAP scores is asked again with a new seed, up to
``max_score_tries`` answers, and the best-scoring answer that passes the gate is kept
(AudioSetCaps' scheme; :meth:`MergeScoring.keep_best` defines the population).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ItemError, PermanentError
from stages.keyframes import middle_index
from stages.merge.backends import ChatRequest
from stages.merge.gate import check_answer
from stages.merge.jobs import RAW_KEEP
from stages.scores import (
    MERGE_CLAP,
    MERGE_CLIP,
    SOURCE_AUDIO_CLAP,
    SOURCE_AUDIO_CLIP,
    SOURCE_VISUAL_CLAP,
    SOURCE_VISUAL_CLIP,
)
from stages.scoring import ClapScorer, ClipScorer, ScoreError, ScoringConfig, cosine

if TYPE_CHECKING:
    import numpy as np

    from pipeline.ledger import Ledger
    from pipeline.stage import Item
    from stages.merge.backends import Backend
    from stages.merge.config import MergeConfig
    from stages.merge.gate import GateSettings
    from stages.merge.jobs import Job

    #: Per clip of the batch: (CLAP audio embedding, CLIP embedding of the middle keyframe).
    Media = dict[int, tuple[np.ndarray, np.ndarray] | ScoreError]


def legacy_score_settings(cfg: MergeConfig, scoring: ScoringConfig) -> dict[str, Any] | None:
    """The scorers and the CLAP rule as rows fingerprinted before scores were a layer recorded
    them (model names, not contents)."""
    if not cfg.score:
        return None
    out: dict[str, Any] = {"clap": scoring.clap().legacy_ident(), "clip": scoring.clip().legacy_ident()}
    if cfg.min_clap_percentile is not None:
        out |= {
            "min_clap_percentile": cfg.min_clap_percentile,
            "max_score_tries": cfg.max_score_tries,
            "score_min_population": cfg.score_min_population,
        }
    return out


def rule_settings(cfg: MergeConfig, scoring: ScoringConfig) -> dict[str, Any] | None:
    """The CLAP rule, when it is on: it picks the kept answer by its CLAP score, so the CLAP model
    and the rule's figures are part of what a merge is made with (None when it is off)."""
    if cfg.min_clap_percentile is None:
        return None
    return {
        "clap": scoring.clap().ident(),
        "min_clap_percentile": cfg.min_clap_percentile,
        "max_score_tries": cfg.max_score_tries,
        "score_min_population": cfg.score_min_population,
    }


def committed_clap_scores(ledger: Ledger, clap_ident: str) -> list[float]:
    """The merge CLAP scores of the run's current ok rows made with this CLAP model."""
    import pyarrow.compute as pc

    if not ledger.exists():
        return []
    table = ledger.latest_table(["status", MERGE_CLAP, "score_models"])
    table = table.filter(pc.equal(table["status"], "ok"))
    mine = [bool(m) and json.loads(m).get("clap") == clap_ident for m in table["score_models"].to_pylist()]
    values = pc.list_flatten(table.filter(mine)[MERGE_CLAP]).to_pylist()
    return [float(v) for v in values if v is not None]


class MergeScoring:
    """One worker's scorers, and the CLAP rule's population: the run's committed merge CLAP
    scores (read here, when the worker starts) and those this worker made since."""

    def __init__(self, cfg: MergeConfig, scoring: ScoringConfig, workdir: Path, ledger: Ledger) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.cfg = cfg
        self.workdir = workdir
        self.loader = ThreadPoolExecutor(4, thread_name_prefix="merge-score-load")
        try:
            self.clap = ClapScorer(scoring.clap(), pool=self.loader)
            self.clip = ClipScorer(scoring.clip(), pool=self.loader)
            self.population = committed_clap_scores(ledger, self.clap.ident)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.loader.shutdown(wait=True, cancel_futures=True)

    def score(
        self, batch: list[Item], by_clip: dict[int, list[Job]], backend: Backend, gate: GateSettings
    ) -> dict[int, dict[str, Any] | ItemError]:
        """The score columns of each clip (or the error that left it unscored); with the CLAP rule
        on, low-scoring merges are asked again first (:meth:`keep_best`)."""
        media = self._media(batch, list(by_clip))
        answered = [
            j
            for jobs in by_clip.values()
            for j in jobs
            if j.verdict and j.verdict.ok and j.error is None and isinstance(media[j.clip], tuple)
        ]
        first = self.clap.text_embeds(j.caption or "" for j in answered)
        for j in answered:
            pair = media[j.clip]
            assert not isinstance(pair, ScoreError)  # `answered` holds clips with media only
            j.clap = cosine(pair[0], first[j.caption or ""])
            j.tries[-1]["clap_score"] = j.clap
        if self.cfg.min_clap_percentile is not None:
            self.keep_best(answered, media, backend, gate)
            self.population += [j.clap for j in answered if j.clap is not None]
        merged = {i: [j.caption for j in jobs] for i, jobs in by_clip.items()}
        tries = {i: max(j.score_tries for j in jobs) for i, jobs in by_clip.items()}
        return self.columns(batch, merged, tries, media)

    def rescore(self, batch: list[Item]) -> dict[int, dict[str, Any] | ItemError]:
        """The score columns of rows whose merges are current (``item.previous``): another scorer,
        or scores that were not made. No LLM is asked."""
        media = self._media(batch, list(range(len(batch))))
        merged = {i: list((it.previous or {}).get("merged_captions") or []) for i, it in enumerate(batch)}
        tries = {i: int((it.previous or {}).get("merge_score_tries") or 1) for i, it in enumerate(batch)}
        return self.columns(batch, merged, tries, media)

    def _media(self, batch: list[Item], clips: list[int]) -> Media:
        """(CLAP audio embedding, CLIP embedding of the middle keyframe) of each clip, from
        stage 2's ``audio_path`` and ``frame_paths[middle_frame]``, or why there is none."""
        out: Media = {}
        audio: dict[int, Path] = {}
        image: dict[int, Path] = {}
        for i in clips:
            data = batch[i].data
            frames = data.get("frame_paths") or []
            if not data.get("audio_path") or not frames:
                out[i] = ScoreError("score_no_media", "stage 2 gave no audio_path or no frame_paths")
                continue
            k = middle_index(len(frames), data.get("middle_frame")) or 0
            audio[i] = self.workdir / data["audio_path"]
            image[i] = self.workdir / frames[k]
        audio_emb = self.clap.audio_embeds(audio.values())
        image_emb = self.clip.image_embeds(image.values())
        for i in audio:
            a, v = audio_emb[audio[i]], image_emb[image[i]]
            if isinstance(a, ScoreError):
                out[i] = a
            elif isinstance(v, ScoreError):
                out[i] = v
            else:
                out[i] = (a, v)
        return out

    def columns(
        self, batch: list[Item], merged: dict[int, list[str | None]], tries: dict[int, int], media: Media
    ) -> dict[int, dict[str, Any] | ItemError]:
        """The score columns of each clip's merges (``merged``: None where a merge failed) and of
        its source captions; a clip whose media the scorers cannot read gets the error instead."""
        texts: list[str] = []
        for i, caps in merged.items():
            texts += [c for c in caps if c is not None]
            texts += [*batch[i].data["audio_captions"], batch[i].data["visual_caption"]]
        clap_t, clip_t = self.clap.text_embeds(texts), self.clip.text_embeds(texts)
        models = json.dumps({"clap": self.clap.ident, "clip": self.clip.ident})
        out: dict[int, dict[str, Any] | ItemError] = {}
        for i, caps in merged.items():
            m = media[i]
            if isinstance(m, ScoreError):
                msg = f"{batch[i].clip_id}: cannot score the merge: {m.message}"
                out[i] = PermanentError(m.reason, msg)
                continue
            a, v = m
            sources = batch[i].data["audio_captions"]
            visual = batch[i].data["visual_caption"]
            out[i] = {
                MERGE_CLAP: [cosine(a, clap_t[c]) if c else None for c in caps],
                MERGE_CLIP: [cosine(v, clip_t[c]) if c else None for c in caps],
                SOURCE_AUDIO_CLAP: [cosine(a, clap_t[c]) for c in sources],
                SOURCE_AUDIO_CLIP: [cosine(v, clip_t[c]) for c in sources],
                SOURCE_VISUAL_CLAP: cosine(a, clap_t[visual]),
                SOURCE_VISUAL_CLIP: cosine(v, clip_t[visual]),
                "merge_score_tries": tries[i],
                "score_models": models,
            }
        return out

    def keep_best(
        self, answered: list[Job], media: dict[int, Any], backend: Backend, gate: GateSettings
    ) -> None:
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
        assert cfg.min_clap_percentile is not None
        threshold = cfg.min_clap_percentile
        pop = np.sort(
            np.asarray(self.population + [j.clap for j in answered if j.clap is not None], dtype="float64")
        )
        if len(pop) < cfg.score_min_population:
            return

        def low(j: Job) -> bool:
            if j.clap is None:
                return False
            rank = 100.0 * np.searchsorted(pop, j.clap, side="right") / len(pop)
            return bool(rank < threshold)

        todo = [j for j in answered if low(j)]
        while todo := [j for j in todo if j.score_tries < cfg.max_score_tries and low(j)]:
            for j in todo:
                j.k += 1  # a seed no earlier try of this merge used
                j.score_tries += 1
            requests = [ChatRequest(j.messages, cfg.seed + j.k, cfg.max_new_tokens) for j in todo]
            answers = backend.generate(requests)
            passed = []
            for j, req, ans in zip(todo, requests, answers, strict=True):
                sent = {"seed": req.seed, "max_tokens": req.max_tokens, "score_retry": True}
                if isinstance(ans, ItemError):  # the kept answer stands
                    j.tries.append({**sent, "error": f"{ans.reason}: {ans.message}"[:RAW_KEEP]})
                    continue
                v = check_answer(ans.text, j.audio, j.visual, gate, ans.finish_reason)
                j.tokens = (j.tokens[0] + ans.prompt_tokens, j.tokens[1] + ans.completion_tokens)
                j.tries.append({**sent, **v.as_dict(), "raw": ans.text[:RAW_KEEP]})
                if v.ok:
                    passed.append((j, v, ans.text))
            emb = self.clap.text_embeds(v.caption or "" for _, v, _ in passed)
            for j, v, text in passed:
                score = cosine(media[j.clip][0], emb[v.caption or ""])
                j.tries[-1]["clap_score"] = score
                if j.clap is None or score > j.clap:
                    j.clap, j.verdict, j.raw = score, v, text
