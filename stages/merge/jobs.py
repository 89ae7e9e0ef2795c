"""Stage 4's merges to make and how each is asked: a clip's audio caption(s) with its visual
caption become one :class:`Job` per merge (one per audio caption in ``per_caption`` mode, one for
all of them in ``all_in_one``), and :func:`ask` asks the backend until each has an answer that
passes the quality gate, or its retries are spent. Every try is kept on the job for audit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ItemError, PermanentError
from stages.merge.backends import ChatRequest
from stages.merge.gate import Verdict, check_answer

if TYPE_CHECKING:
    from pipeline.stage import Item
    from stages.merge.backends import Backend
    from stages.merge.config import MergeConfig
    from stages.merge.gate import GateSettings
    from stages.merge.prompt import Prompt

RAW_KEEP = 2000  # characters of each failed try kept in merge_checks


@dataclass
class Job:
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

    @property
    def caption(self) -> str | None:
        """The kept answer's caption, once it passed the gate (else None)."""
        return self.verdict.caption if self.verdict and self.verdict.ok else None


def jobs_for(idx: int, item: Item, prompt: Prompt, cfg: MergeConfig) -> list[Job]:
    """The merges of the batch's clip ``idx``, or a ``bad_input`` failure when its captions are
    missing or empty."""
    audio = item.data.get("audio_captions")
    visual = item.data.get("visual_caption")
    if not isinstance(audio, list) or not audio or not all(isinstance(a, str) and a.strip() for a in audio):
        msg = f"{item.clip_id}: audio_captions must be non-empty strings: {audio!r}"
        raise PermanentError("bad_input", msg)
    if not isinstance(visual, str) or not visual.strip():
        raise PermanentError("bad_input", f"{item.clip_id}: visual_caption is empty: {visual!r}")
    groups = [[a] for a in audio] if cfg.mode == "per_caption" else [audio]
    return [
        Job(idx, g, visual, prompt.messages(g, visual, cfg.max_words), cfg.max_new_tokens) for g in groups
    ]


def request(job: Job, cfg: MergeConfig) -> ChatRequest:
    """The job's next request: its seed moves on with each quality retry."""
    return ChatRequest(job.messages, cfg.seed + job.k, job.max_tokens)


def ask(backend: Backend, todo: list[Job], gate: GateSettings, cfg: MergeConfig) -> None:
    """Ask the backend for every job, with a bigger budget for a cut-off answer (once) and a
    new seed for one failing the gate (``max_quality_retries``)."""
    while todo:
        requests = [request(j, cfg) for j in todo]
        answers = backend.generate(requests)
        again = []
        for job, req, ans in zip(todo, requests, answers, strict=True):
            sent = {"seed": req.seed, "max_tokens": req.max_tokens}
            if isinstance(ans, ItemError):
                job.error = ans
                job.tries.append({**sent, "error": f"{ans.reason}: {ans.message}"[:RAW_KEEP]})
                continue
            v = check_answer(ans.text, job.audio, job.visual, gate, ans.finish_reason)
            job.verdict, job.raw = v, ans.text
            job.tokens = (job.tokens[0] + ans.prompt_tokens, job.tokens[1] + ans.completion_tokens)
            job.tries.append({**sent, **v.as_dict(), "raw": ans.text[:RAW_KEEP]})
            if v.reason == "truncated" and job.max_tokens < cfg.retry_budget:
                job.max_tokens = cfg.retry_budget  # once: same seed, a larger budget
                again.append(job)
            elif not v.ok and job.k < cfg.max_quality_retries:
                job.k += 1
                again.append(job)
        todo = again
