"""Stage 4's dry run (``avcaps run 4 --dry-run N``): how a user tunes the prompt and the gate.

Each merge of the first clips is asked once (the seed a run tries first, no retries), and the
request exactly as the backend sends it, the answer and the gate's verdict with its figures are
printed. Nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pipeline.errors import ItemError
from stages.merge.gate import check_answer
from stages.merge.jobs import jobs_for, request

if TYPE_CHECKING:
    from pipeline.stage import Item
    from stages.merge.backends import Answer, Backend
    from stages.merge.config import MergeConfig
    from stages.merge.gate import GateSettings
    from stages.merge.jobs import Job
    from stages.merge.prompt import Prompt


def preview(
    batch: list[Item], prompt: Prompt, cfg: MergeConfig, backend: Backend, gate: GateSettings
) -> Iterator[str]:
    """One text per merge of ``batch`` (or per clip whose captions cannot be merged)."""
    for item in batch:
        try:
            jobs = jobs_for(0, item, prompt, cfg)
        except ItemError as exc:
            yield f"=== {item.clip_id}: {exc.reason}: {exc.message}\n"
            continue
        requests = [request(j, cfg) for j in jobs]
        answers = backend.generate(requests)
        for n, (job, req, ans) in enumerate(zip(jobs, requests, answers, strict=True), 1):
            head = f"=== {item.clip_id} merge {n}/{len(jobs)}"
            out = [f"{head} ({prompt.version}, {backend.name})", "--- request"]
            out.append(backend.request_text(req))
            out += _answer(job, ans, gate)
            yield "\n".join(out) + "\n"


def _answer(job: Job, ans: Answer | ItemError, gate: GateSettings) -> list[str]:
    """The answer's lines: the text and what the gate says of it, or the error."""
    if isinstance(ans, ItemError):
        return ["--- error", f"{ans.status} {ans.reason}: {ans.message}"]
    v = check_answer(ans.text, job.audio, job.visual, gate, ans.finish_reason)
    figures = v.as_dict()
    for key in ("ok", "reason", "caption"):
        figures.pop(key)
    return [
        f"--- answer (finish_reason {ans.finish_reason}, "
        f"{ans.prompt_tokens} prompt + {ans.completion_tokens} completion tokens)",
        ans.text,
        f"--- gate: {'ok' if v.ok else 'gate_' + v.reason}: {v.caption!r}",
        json.dumps(figures, ensure_ascii=False),
    ]
