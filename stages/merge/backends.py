"""LLM backends of stage 4 behind one small interface: chat requests in, answers out.

- :class:`OpenAIBackend`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (in production
  ``vllm serve openai/gpt-oss-20b``, see ``make llm-server``), through ``httpx`` with a bounded
  thread pool, timeouts, and backoff on 429/5xx/connection errors.
- :class:`VLLMBackend`: in-process offline ``vllm.LLM.chat`` batching on one GPU box.
- :class:`TransformersBackend`: in-process ``generate`` with the model's chat template.

Each imports its dependencies lazily. ``generate`` returns one :class:`Answer` (with the LLM's
``finish_reason``: ``"length"`` when it hit ``max_tokens``) or one
:class:`~pipeline.errors.ItemError` per request, in order, so one failed request never sinks the
others. ``preflight`` proves, before the first item, that the backend can answer at all (the
server is up, takes the key, serves the model; the model folder loads and generates): a run that
could merge nothing stops with :class:`~pipeline.errors.AbortRun` (exit 2) instead of failing
every clip. ``request_text`` shows a request exactly as it is sent (``avcaps run 4 --dry-run``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
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
    max_tokens: int | None = None  # None: merge.max_new_tokens


@dataclass
class Answer:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length" (cut off at max_tokens), ...


class Backend(Protocol):
    name: str
    model: str

    def preflight(self) -> None: ...

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]: ...

    def request_text(self, req: ChatRequest) -> str: ...

    def close(self) -> None: ...


# The preflight's one tiny completion: any answer will do, it only has to come back.
PREFLIGHT_MESSAGES = [{"role": "user", "content": "Say OK."}]


def one_line(text: object, limit: int = 300) -> str:
    """A server's message folded onto one line and cut, for a one-line error."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_model_folder(model: str, backend: str) -> None:
    """Abort unless ``model`` is a Hub id or a folder holding a model (``config.json``).

    A local path (absolute, ``./``, ``../``, ``~``, or one that exists) is checked here, before an
    engine spends minutes starting or the loader mistakes a missing folder for a Hub id; a Hub id
    is left to the loader (offline it comes from the cache or fails there)."""
    path = Path(model).expanduser()
    if not (path.is_absolute() or model.startswith((".", "~")) or path.exists()):
        return
    where = f"merge.model {model!r} ({backend} backend)"
    if not path.is_dir():
        raise AbortRun(f"{where}: no such folder")
    if not (path / "config.json").is_file():
        raise AbortRun(f"{where}: no config.json in it (is it a model folder?)")


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
            "max_tokens": req.max_tokens or self.cfg.max_new_tokens,
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

    def request_text(self, req: ChatRequest) -> str:
        return f"POST {self.cfg.base_url.rstrip('/')}/chat/completions\n" + json.dumps(
            self.body(req), indent=2, ensure_ascii=False
        )

    def _preflight_call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One preflight call, retried like a request on a connection error, a timeout, 429 or
        5xx (a server still starting), then an abort saying the server is unreachable."""
        import httpx

        where = f"{self.cfg.base_url} (model {self.model!r})"
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(self.cfg.retry_backoff_s * 2 ** (attempt - 1), 30.0))
            try:
                resp = self.client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text}"
                continue
            if resp.status_code in (401, 403):
                env = self.cfg.api_key_env
                var = f"${env}" if env else "no variable (merge.api_key_env is null)"
                raise AbortRun(
                    f"merge preflight: {where} rejected the API key (HTTP {resp.status_code}): "
                    f"{one_line(resp.text, 120)}; the key is read from {var}"
                )
            return resp
        raise AbortRun(
            f"merge preflight: LLM server {where} unreachable after {self.cfg.retries + 1} tries: "
            f"{one_line(last)}; start it (make llm-server) or set merge.base_url"
        )

    def preflight(self) -> None:
        """``GET /models`` (the key is taken, the model is served, its context holds the token
        budgets), then one tiny completion in the body form every request uses."""
        where = f"{self.cfg.base_url} (model {self.model!r})"
        resp = self._preflight_call("GET", "/models")
        if resp.status_code == 200:
            try:
                served = {m["id"]: m for m in resp.json()["data"]}
            except (ValueError, KeyError, TypeError) as exc:
                msg = f"merge preflight: {where}: /models is not an OpenAI model list: {exc}"
                raise AbortRun(msg) from exc
            if self.model not in served:
                raise AbortRun(
                    f"merge preflight: {where}: the server does not serve this model "
                    f"(it serves: {', '.join(sorted(served)) or 'nothing'}); set merge.model"
                )
            context = served[self.model].get("max_model_len")  # vLLM says it; others may not
            budget = max(self.cfg.max_new_tokens, self.cfg.retry_budget)
            if isinstance(context, int) and budget >= context:
                raise AbortRun(
                    f"merge preflight: {where}: a token budget of {budget} (merge.max_new_tokens or "
                    f"merge.retry_max_new_tokens) leaves no room for the prompt in a {context}-token context"
                )
        req = ChatRequest(PREFLIGHT_MESSAGES, self.cfg.seed, max_tokens=1)
        resp = self._preflight_call("POST", "/chat/completions", json=self.body(req))
        if resp.status_code == 404:
            raise AbortRun(f"merge preflight: {where}: unknown model (HTTP 404): {one_line(resp.text)}")
        if resp.status_code != 200:
            raise AbortRun(
                f"merge preflight: {where} refused a test request (HTTP {resp.status_code}): "
                f"{one_line(resp.text)}"
            )
        log.info("merge preflight: %s answers", where)

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
                choice = data["choices"][0]
                msg = choice["message"]
                usage = data.get("usage") or {}
            except (ValueError, KeyError, IndexError) as exc:
                return PermanentError("bad_response", f"{type(exc).__name__}: {resp.text[:300]}")
            return Answer(
                msg.get("content") or "",
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                choice.get("finish_reason"),
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
        check_model_folder(cfg.model, self.name)
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
        try:
            self.llm = LLM(model=cfg.model, **(args | cfg.vllm_engine_args))
        except Exception as exc:  # vLLM raises many kinds; any of them means no model to run
            raise AbortRun(
                f"merge.model {cfg.model!r} (vllm backend) cannot be loaded: {type(exc).__name__}: "
                f"{one_line(exc)}"
            ) from exc

    def _params(self, req: ChatRequest) -> dict[str, Any]:
        return {
            "max_tokens": req.max_tokens or self.cfg.max_new_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "seed": req.seed,
        }

    def _template_kwargs(self) -> dict[str, Any]:
        return {"reasoning_effort": self.cfg.reasoning_effort} if self.cfg.reasoning_effort else {}

    def request_text(self, req: ChatRequest) -> str:
        sent = {
            "messages": req.messages,
            "sampling_params": self._params(req),
            "structured_outputs": answer_schema(self.cfg.max_chars) if self.cfg.structured_output else None,
            "chat_template_kwargs": self._template_kwargs(),
        }
        return "vllm.LLM.chat\n" + json.dumps(sent, indent=2, ensure_ascii=False)

    def preflight(self) -> None:
        (ans,) = self.generate([ChatRequest(PREFLIGHT_MESSAGES, self.cfg.seed, max_tokens=1)])
        if not isinstance(ans, Answer) or ans.completion_tokens < 1:
            raise AbortRun(f"merge preflight: model {self.model!r} (vllm backend) generated nothing: {ans}")

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if self.cfg.structured_output:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=answer_schema(self.cfg.max_chars))
        params = [SamplingParams(**self._params(r), **extra) for r in requests]
        outs = self.llm.chat(
            [r.messages for r in requests],
            params,
            use_tqdm=False,
            chat_template_kwargs=self._template_kwargs(),
        )
        return [
            Answer(
                o.outputs[0].text,
                len(o.prompt_token_ids or []),
                len(o.outputs[0].token_ids),
                o.outputs[0].finish_reason,
            )
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
        check_model_folder(cfg.model, self.name)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.model = cfg.model
        self.torch = torch
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tok = AutoTokenizer.from_pretrained(cfg.model, padding_side="left")
            dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
            model: Any = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
            self.lm = model.to(device).eval()
        except (OSError, ValueError, RuntimeError) as exc:  # missing files, bad config, device
            raise AbortRun(
                f"merge.model {cfg.model!r} (transformers backend, {device}) cannot be loaded: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from exc
        self.device = device
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        eos = self.lm.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_ids.add(self.tok.eos_token_id)

    def _prompt(self, req: ChatRequest) -> str:
        # reasoning_effort reaches gpt-oss's chat template as a template variable.
        kwargs: dict[str, Any] = (
            {"reasoning_effort": self.cfg.reasoning_effort} if self.cfg.reasoning_effort else {}
        )
        text = self.tok.apply_chat_template(
            req.messages, add_generation_prompt=True, tokenize=False, **kwargs
        )
        assert isinstance(text, str)  # tokenize=False: the prompt as text
        return text

    def request_text(self, req: ChatRequest) -> str:
        return f"{self.model} generate(max_new_tokens={req.max_tokens or self.cfg.max_new_tokens})\n" + (
            self._prompt(req)
        )

    def preflight(self) -> None:
        where = f"model {self.model!r} (transformers backend, {self.device})"
        try:
            (ans,) = self.generate([ChatRequest(PREFLIGHT_MESSAGES, self.cfg.seed, max_tokens=1)])
        except Exception as exc:  # a template error, a device error: no clip could be merged either
            raise AbortRun(
                f"merge preflight: {where} failed a test generation: {type(exc).__name__}: {one_line(exc)}"
            ) from exc
        if not isinstance(ans, Answer) or ans.completion_tokens < 1:
            raise AbortRun(f"merge preflight: {where} generated nothing: {ans}")

    def generate(self, requests: list[ChatRequest]) -> list[Answer | ItemError]:
        torch = self.torch
        out: list[Answer | ItemError] = [PermanentError("no_answer")] * len(requests)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.seed, r.max_tokens or self.cfg.max_new_tokens), []).append(i)
        for (seed, max_tokens), idx in groups.items():
            prompts = [self._prompt(requests[i]) for i in idx]
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(self.device)
            torch.manual_seed(seed)
            sample = self.cfg.temperature > 0
            with torch.inference_mode():
                gen = self.lm.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=sample,
                    temperature=self.cfg.temperature if sample else None,
                    top_p=self.cfg.top_p if sample else None,
                    pad_token_id=self.tok.pad_token_id,
                )
            n_in = enc["input_ids"].shape[1]
            for row, i in enumerate(idx):
                new = gen[row, n_in:]
                n_new = int((new != self.tok.pad_token_id).sum())
                # As vLLM reports it: "stop" at an end token, "length" when the budget ran out.
                stopped = any(int(t) in self.eos_ids for t in new)
                finish = "stop" if stopped else ("length" if n_new >= max_tokens else "stop")
                raw = str(self.tok.decode(new, skip_special_tokens=False))
                text = harmony_final(raw)
                if text is None:
                    text = str(self.tok.decode(new, skip_special_tokens=True))
                out[i] = Answer(text, int(enc["attention_mask"][row].sum()), n_new, finish)
        return out

    def close(self) -> None:
        del self.lm
