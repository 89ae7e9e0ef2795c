"""Stage 4: merge each clip's audio caption(s) and visual caption into one caption with an LLM.

As in the paper, the test split is merged (``merge.splits``); each of its 5 AudioCaps captions is
merged with the BLIP-2 caption on its own (``mode: per_caption``, 5 references) or all 5 at once
(``mode: all_in_one``, one reference). The prompt is one versioned file
(``stages/merge/prompts/merge_v1.yaml``, few-shot examples included) whose sha256 goes on every
row; the settings are :mod:`stages.merge.config`, the LLM backends :mod:`stages.merge.backends`.

Every answer passes the quality gate (:mod:`stages.merge.gate`); a failing one is asked again with
a new seed up to ``max_quality_retries`` times, then the clip is ``failed_permanent`` with reason
``gate_<check>``. An unreachable or overloaded server fails the clip transiently (``llm_*``), so
the runner retries it later. The raw answers and every check are kept on the row for audit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.errors import AbortRun, ItemError, PermanentError, TransientError
from pipeline.stage import Item, ItemStage, Resources, Result
from stages.merge.backends import Answer, Backend, ChatRequest, make_backend
from stages.merge.config import MergeConfig
from stages.merge.gate import GateSettings, Verdict, check_answer

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

DEFAULT_PROMPT = Path(__file__).parent / "prompts" / "merge_v1.yaml"
RAW_KEEP = 2000  # characters of each failed try kept in merge_checks


@dataclass(frozen=True)
class Prompt:
    version: str
    sha256: str
    system: str
    user_one: str
    user_all: str
    few_shot: list[dict[str, str]]

    @classmethod
    def load(cls, path: Path) -> Prompt:
        import yaml

        try:
            raw = path.read_bytes()
            data = yaml.safe_load(raw)
            return cls(
                version=str(data["version"]),
                sha256=hashlib.sha256(raw).hexdigest(),
                system=data["system"],
                user_one=data["user_one"],
                user_all=data["user_all"],
                few_shot=list(data.get("few_shot") or []),
            )
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise AbortRun(f"merge prompt file {path}: {type(exc).__name__}: {exc}") from exc

    def messages(self, audio: list[str], visual: str, max_words: int) -> list[dict[str, str]]:
        """System text, the few-shot pairs as earlier turns, then this clip's captions."""

        def fill(template: str, a: str, v: str) -> str:
            return template.replace("{audio}", a).replace("{visual}", v).strip()

        msgs = [{"role": "system", "content": self.system.replace("{max_words}", str(max_words)).strip()}]
        for ex in self.few_shot:
            msgs.append({"role": "user", "content": fill(self.user_one, ex["audio"], ex["visual"])})
            msgs.append({"role": "assistant", "content": json.dumps({"caption": ex["caption"]})})
        if len(audio) == 1:
            msgs.append({"role": "user", "content": fill(self.user_one, audio[0], visual)})
        else:
            listed = "\n".join(f"{i}. {a}" for i, a in enumerate(audio, 1))
            msgs.append({"role": "user", "content": fill(self.user_all, listed, visual)})
        return msgs


@dataclass
class _Job:
    """One merge to make: a clip's audio caption(s) with its visual caption."""

    clip: int
    audio: list[str]
    visual: str
    messages: list[dict[str, str]]
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

    @cached_property
    def prompt(self) -> Prompt:
        return Prompt.load(self.cfg.prompt_file or DEFAULT_PROMPT)

    @cached_property
    def gate(self) -> GateSettings:
        c = self.cfg
        return GateSettings(c.max_words, c.min_words, c.min_audio_overlap, c.min_visual_overlap)

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
        return [_Job(idx, g, visual, self.prompt.messages(g, visual, self.cfg.max_words)) for g in groups]

    def _check(self, job: _Job, answer: Answer) -> Verdict:
        """In all-in-one mode the audio side counts as covered if any one reference is."""
        best: Verdict | None = None
        for a in job.audio:
            v = check_answer(answer.text, a, job.visual, self.gate)
            if best is None or v.audio_overlap > best.audio_overlap:
                best = v
            if v.ok:
                return v
        assert best is not None
        return best

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
        for k in range(self.cfg.max_quality_retries + 1):
            if not todo:
                break
            seed = self.cfg.seed + k
            answers = self.backend.generate([ChatRequest(j.messages, seed) for j in todo])
            again = []
            for job, ans in zip(todo, answers, strict=True):
                if isinstance(ans, ItemError):
                    job.error = ans
                    job.tries.append({"seed": seed, "error": f"{ans.reason}: {ans.message}"[:RAW_KEEP]})
                    continue
                v = self._check(job, ans)
                job.verdict, job.raw = v, ans.text
                job.tokens = (job.tokens[0] + ans.prompt_tokens, job.tokens[1] + ans.completion_tokens)
                job.tries.append({"seed": seed, **v.as_dict(), "raw": ans.text[:RAW_KEEP]})
                if not v.ok:
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
