"""``avcaps fetch-spice``: checksummed install of the CoreNLP jars, from a Maven-layout HTTP
server on 127.0.0.1 (a stand-in for Maven Central, unreachable here, serving small stand-in jars)
or from Stanford's zip; a SPICE run whose jars are not CoreNLP fails with its reason."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from evalkit.metrics import evaluate
from evalkit.spice import JARS, SUMS, ZIP_FOLDER, check_jars, fetch_jars
from pipeline.cli import main
from pipeline.errors import AbortRun


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "mirror"
    root.mkdir()
    for jar in JARS:
        with zipfile.ZipFile(root / jar, "w") as zf:
            zf.writestr("META-INF/MANIFEST.MF", f"Manifest-Version: 1.0\nName: {jar}\n")
        (root / f"{jar}.sha1").write_text(hashlib.sha1((root / jar).read_bytes()).hexdigest() + "\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_checks_the_published_sha1(mirror, tmp_path: Path) -> None:
    url, root = mirror
    target = tmp_path / "spice"
    r = CliRunner().invoke(main, ["fetch-spice", "--spice-dir", str(target), "--base-url", url])
    assert r.exit_code == 0, r.output
    for jar in JARS:
        assert (target / jar).read_bytes() == (root / jar).read_bytes()
    assert (target / SUMS).is_file() and (target / "cache").is_dir()
    assert check_jars(target) is None
    assert "SPICE ready" in r.output
    # A tampered download is refused and nothing half-written stays behind.
    (root / f"{JARS[0]}.sha1").write_text("0" * 40 + "\n")
    (target / JARS[0]).unlink()
    with pytest.raises(AbortRun, match="does not match the published"):
        fetch_jars(target, url)
    assert not (target / JARS[0]).exists()
    assert [p.name for p in target.iterdir() if p.name.startswith(".tmp-")] == []
    assert "not found" in (check_jars(target) or "")


def test_fetch_without_network_names_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(AbortRun, match="--from-zip"):
        fetch_jars(tmp_path / "s", "http://127.0.0.1:9", timeout=2)


def test_from_zip_and_a_failed_spice_run_is_reported_not_scored(mirror, tmp_path: Path) -> None:
    _, root = mirror
    z = tmp_path / "stanford-corenlp-full-2015-12-09.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for jar in JARS:
            zf.write(root / jar, f"{ZIP_FOLDER}/{jar}")
    target = tmp_path / "spice"
    fetch_jars(target, from_zip=z)
    assert check_jars(target) is None
    # The stand-in jars hold no CoreNLP: the real SPICE jar runs on Java and fails; the metric is
    # then unavailable with java's reason, never a number.
    refs = {"a_0_10000": ["a dog barks loudly", "a dog is barking"], "b_0_10000": ["a man speaks"]}
    preds = {"a_0_10000": "a dog barks", "b_0_10000": "a woman speaks"}
    scores = evaluate(preds, refs, spice_dir=target)
    assert scores.values["SPICE"] is None and scores.values["SPIDEr"] is None
    assert scores.unavailable["SPICE"].startswith("SPICE failed: java exited with")
    assert "NoClassDefFoundError: edu/stanford/nlp" in scores.unavailable["SPICE"]
    assert scores.values["CIDEr-D"] is not None
