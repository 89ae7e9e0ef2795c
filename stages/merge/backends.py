"""LLM backends of stage 4 behind one small interface: chat requests in, answers out.

- :class:`OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (in production
  ``vllm serve openai/gpt-oss-20b``, see ``make llm-server``), through ``httpx`` with a bounded
  thread pool, timeouts, and backoff on 429/5xx/connection errors.
- :class:`VLLMBackend`: in-process offline ``vllm.LLM.chat`` batching on one GPU box.
- :class:`TransformersBackend`: in-process ``generate`` with the model's chat template.

Each imports its dependencies lazily. ``generate`` returns one :class:`Answer` or one
:class:`~pipeline.errors.ItemError` per request, in order, so one failed request never sinks the
others.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.errors import AbortRun, ItemError, PermanentError, TransientError
from stages.merge.config import MergeConfig

log = logging.getLogger("avcaps")


def answer_schema(max_chars: int) -> dict[str, Any]:
    """The structured-output schema ``{"caption": string}``. ``maxLength`` lets the grammar close
    the string and the object, so even a rambling model returns complete JSON within budget."""
    return {
        "type": "object",
        "properties": {"caption": {"type": "string", "minLength": 1, "maxLength": max_chars}},
        "required": ["caption"],
        "additionalProperties": False,
    }


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    seed: int


@dataclass
class Answer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Backend(Protocol):
    name: str
    model: str

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]: ...

    def close(self) -> None: ...


def make_backend(cfg: MergeConfig) -> Backend:
    if cfg.backend == "openai":
        return OpenAIBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg)
    return TransformersBackend(cfg)


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint, ``concurrency`` requests in flight at most."""

    name = "openai"

    def __init__(self, cfg: MergeConfig) -> None:
        import httpx

        self.cfg = cfg
        self.model = cfg.model
        headers = {}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"  # from the environment only, never logged
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self.client = httpx.Client(
            base_url=cfg.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
            limits=limits,
        )

    def body(self, req: ChatRequest) -> dict[str, Any]:
        """The request body in the form vLLM's server accepts (``reasoning_effort`` top level,
        structured output as an OpenAI ``response_format`` JSON schema)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": req.messages,
            "max_tokens": self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "seed": req.seed,
        }
        if self.cfg.reasoning_effort:
            body["reasoning_effort"] = self.cfg.reasoning_effort
        if self.cfg.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "merged_caption",
                    "schema": answer_schema(self.cfg.max_chars),
                    "strict": True,
                },
            }
        return body

    def _one(self, req: ChatRequest) -> Answer | ItemError:
        import httpx

        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                delay = min(self.cfg.retry_backoff_s * 2 ** (attempt - 1), 30.0)
                time.sleep(delay * (0.5 + random.random()))  # jitter: do not stampede a busy server
            try:
                resp = self.client.post("/chat/completions", json=self.body(req))
            except httpx.TimeoutException as exc:
                last = f"timeout: {type(exc).__name__}"
                continue
            except httpx.TransportError as exc:
                last = f"connection: {type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"http_{resp.status_code}: {resp.text[:200]}"
                continue
            if resp.status_code != 200:
                return PermanentError(f"http_{resp.status_code}", resp.text[:500])
            try:
                data = resp.json()
                msg = data["choices"][0]["message"]
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError) as exc:
                return PermanentError("bad_response", f"{type(exc).__name__}: {resp.text[:300]}")
            return Answer(
                msg.get("content") or "",
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
            )
        reason = last.split(":", 1)[0] if last else "unavailable"
        return TransientError(
            f"llm_{reason}", f"{self.cfg.base_url}: {last} (after {self.cfg.retries + 1} tries)"
        )

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]:
        from concurrent.futures import ThreadPoolExecutor

        if len(requests) <= 1 or self.cfg.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def close(self) -> None:
        self.client.close()


class VLLMBackend:
    """Offline ``vllm.LLM.chat`` on this machine's GPU (optional extra; needs vLLM installed).

    Structured output is requested through ``StructuredOutputsParams``; with gpt-oss's reasoning
    parser it does not activate offline (vLLM issue 37359), so the gate's plain-answer recovery
    matters here.
    """

    name = "vllm"

    def __init__(self, cfg: MergeConfig) -> None:
        try:
            from vllm import LLM
        except ImportError as exc:
            raise AbortRun(
                "merge.backend=vllm needs vLLM in this environment (its pins clash with the pipeline's; "
                "use backend=openai with `make llm-server` instead)"
            ) from exc
        self.cfg = cfg
        self.model = cfg.model
        args: dict[str, Any] = {"gpu_memory_utilization": cfg.gpu_memory_utilization, "seed": 0}
        self.llm = LLM(model=cfg.model, **(args | cfg.vllm_engine_args))

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if self.cfg.structured_output:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=answer_schema(self.cfg.max_chars))
        params = [
            SamplingParams(
                max_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                seed=r.seed,
                **extra,
            )
            for r in requests
        ]
        kwargs = {"reasoning_effort": self.cfg.reasoning_effort} if self.cfg.reasoning_effort else {}
        outs = self.llm.chat(
            [r.messages for r in requests], params, use_tqdm=False, chat_template_kwargs=kwargs
        )
        return [
            Answer(o.outputs[0].text, len(o.prompt_token_ids or []), len(o.outputs[0].token_ids))
            for o in outs
        ]

    def close(self) -> None:
        del self.llm


HARMONY_FINAL = "<|channel|>final<|message|>"


def harmony_final(text: str) -> str | None:
    """The final-channel message of a gpt-oss (Harmony) completion decoded with its special
    tokens, or None when the text is not Harmony. The analysis channel (reasoning) is dropped,
    as vLLM's ``openai_gptoss`` reasoning parser does on the server side."""
    if HARMONY_FINAL not in text:
        return None
    final = text.rsplit(HARMONY_FINAL, 1)[1]
    for end in ("<|return|>", "<|end|>", "<|call|>"):
        final = final.split(end, 1)[0]
    return final.strip()


class TransformersBackend:
    """In-process ``generate`` with the model's chat template (CPU or GPU; slow, needs nothing else).

    Requests sharing a seed are generated as one left-padded batch after ``torch.manual_seed``, so
    a retry with a new seed samples a new answer and a rerun reproduces the old one.
    """

    name = "transformers"

    def __init__(self, cfg: MergeConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model = cfg.model
        self.torch = torch
        try:
            self.tok = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
            device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            self.lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        except OSError as exc:
            raise AbortRun(f"merge.model {cfg.model!r} cannot be loaded: {exc}") from exc
        self.device = device
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]:
        torch = self.torch
        out: list[Answer | ItemError] = [PermanentError("no_answer")] * len(requests)
        kwargs = {"reasoning_effort": self.cfg.reasoning_effort} if self.cfg.reasoning_effort else {}
        by_seed: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            by_seed.setdefault(r.seed, []).append(i)
        for seed, idx in by_seed.items():
            prompts = [
                self.tok.apply_chat_template(
                    requests[i].messages, add_generation_prompt=True, tokenize=False, **kwargs
                )
                for i in idx
            ]
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.device)
            torch.manual_seed(seed)
            sample = self.cfg.temperature > 0
            with torch.inference_mode():
                gen = self.lm.generate(
                    **enc,
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=sample,
                    temperature=self.cfg.temperature if sample else None,
                    top_p=self.cfg.top_p if sample else None,
                    pad_token_id=self.tok.pad_token_id,
                )
            n_in = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                new = gen[row, n_in:]
                n_new = int((new != self.tok.pad_token_id).sum())
                text = harmony_final(self.tok.decode(new, skip_special_tokens=False))
                if text is None:
                    text = self.tok.decode(new, skip_special_tokens=True)
                out[i] = Answer(text, int(enc["attention_mask"][row].sum()), n_new)
        return out

    def close(self) -> None:
        del self.lm
