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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import AbortRun, ItemError, PermanentError, TransientError
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.merge.backends import Backend, ChatRequest, make_backend
from stages.merge.config import MergeConfig, gate_settings
from stages.merge.gate import GATE_VERSION, GateSettings, Verdict, check_answer

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "merge_v2.yaml"
RAW_KEEP = 2000  # characters of each failed try kept in merge_checks


@dataclass(frozen=True)
class Prompt:
    """A prompt file: system text, the two user templates, and few-shot examples per form.

    ``few_shot_one`` examples (one audio caption each) precede a one-caption prompt,
    ``few_shot_all`` examples (a list of audio captions each) an all-captions prompt. A file with
    a single ``few_shot`` list (``merge_v1``) uses it for both forms, as v1 did.
    """

    version: str
    sha256: str
    system: str
    user_one: str
    user_all: str
    few_shot_one: list[dict[str, Any]]
    few_shot_all: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Prompt:
        import yaml

        try:
            raw = path.read_bytes()
            data = yaml.safe_load(raw)
            legacy = list(data.get("few_shot") or [])
            prompt = cls(
                version=str(data["version"]),
                sha256=hashlib.sha256(raw).hexdigest(),
                system=data["system"],
                user_one=data["user_one"],
                user_all=data["user_all"],
                few_shot_one=list(data.get("few_shot_one") or legacy),
                few_shot_all=list(data.get("few_shot_all") or legacy),
            )
            for ex in prompt.few_shot_one + prompt.few_shot_all:
                missing = {"audio", "visual", "caption"} - set(ex)
                if missing:
                    raise KeyError(f"few-shot example {ex!r} lacks {sorted(missing)}")
        except (OSError, AttributeError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise AbortRun(f"merge prompt file {path}: {type(exc).__name__}: {exc}") from exc
        return prompt

    def user(self, audio: str | list[str], visual: str) -> str:
        """The user turn for one audio caption (a string) or several (a list: numbered)."""
        if isinstance(audio, str):
            template, text = self.user_one, audio
        else:
            template, text = self.user_all, "\n".join(f"{i}. {a}" for i, a in enumerate(audio, 1))
        return template.replace("{audio}", text).replace("{visual}", visual).strip()

    def messages(self, audio: list[str], visual: str, max_words: int) -> list[dict[str, str]]:
        """System text, the few-shot pairs of this form as earlier turns, then this clip's captions."""
        msgs = [{"role": "system", "content": self.system.replace("{max_words}", str(max_words)).strip()}]
        for ex in self.few_shot_one if len(audio) == 1 else self.few_shot_all:
            msgs.append({"role": "user", "content": self.user(ex["audio"], ex["visual"])})
            msgs.append({"role": "assistant", "content": json.dumps({"caption": ex["caption"]})})
        msgs.append({"role": "user", "content": self.user(audio[0] if len(audio) == 1 else audio, visual)})
        return msgs


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


class MergeStage(ItemStage):
    number: ClassVar[int] = 4
    name: ClassVar[str] = "merge"
    upstream: ClassVar[str | None] = "caption"
    description: ClassVar[str] = "LLM merge of the audio and visual captions, with a quality gate"
    resources: ClassVar[Resources] = Resources(cpus=1.0)

    backend: Backend | None = None

    @property
    def cfg(self) -> MergeConfig:
        return self.stage_config  # type: ignore[return-value]

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
        return {**{k: getattr(cfg, k) for k in keys}, "prompt": self.prompt.sha256, "gate": GATE_VERSION}

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
        ]

    selection_columns = ("split",)

    def select(self, table: pd.DataFrame) -> Any:
        return table["split"].isin(self.cfg.splits)

    def setup(self) -> None:
        _ = self.prompt  # a broken prompt file aborts before any model loads
        self.backend = make_backend(self.cfg)
        try:
            self.backend.preflight()  # no item is tried against a backend that cannot answer
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None

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
        todo = jobs
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
        by_clip: dict[int, list[_Job]] = {}
        for job in jobs:
            by_clip.setdefault(job.clip, []).append(job)
        for i, clip_jobs in by_clip.items():
            results[i] = self._result(batch[i], clip_jobs)
        return [results[i] for i in range(len(batch))]

    def _result(self, item: Item, jobs: list[_Job]) -> Result:
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
