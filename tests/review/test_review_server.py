"""The launcher behind `make review-server`: real server, loopback only, secrets never printed."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from pipeline.errors import AbortRun
from stages.review.server import LabelStudioServer, free_port
from standins.review_run import REPO
from standins.review_run import TEST_CREDS as CREDS

pytestmark = pytest.mark.slow
LS_VENV = REPO / ".venv-labelstudio"


def test_a_busy_port_is_refused_not_silently_moved(tmp_path: Path, ls_server: LabelStudioServer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = LabelStudioServer(LS_VENV, tmp_path / "ls", tmp_path, CREDS, port=port)
        with pytest.raises(AbortRun, match=f"port {port} on 127.0.0.1 is busy"):
            srv.start()
    assert srv.proc is None


def test_review_server_command_serves_the_run_and_stops_on_ctrl_c(
    tmp_path: Path, ls_server: LabelStudioServer
) -> None:
    workdir = tmp_path / "run"
    # A copy of the session's migrated template, so the command starts in seconds.
    shutil.copytree(LS_VENV / "avcaps-test-template", workdir / "05-review" / "label-studio")
    (workdir / "media").mkdir()
    port = free_port()
    env = os.environ | {
        "LABEL_STUDIO_USERNAME": CREDS.username,
        "LABEL_STUDIO_PASSWORD": CREDS.password,
        "LABEL_STUDIO_API_KEY": CREDS.api_key,
    }
    cmd = [str(Path(sys.executable).parent / "avcaps"), "review", "server", "--config", "manifests/demo.yaml"]
    cmd += ["--workdir", str(workdir), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not any("Ctrl-C stops" in line for line in lines):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
        out = "".join(lines)
        assert f"Label Studio is up at http://127.0.0.1:{port}" in out, out
        assert CREDS.username in out and "invite" in out
        r = requests.get(
            f"http://127.0.0.1:{port}/api/current-user/whoami",
            headers={"Authorization": f"Token {CREDS.api_key}"},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["email"] == CREDS.username
        # Signup without an invite link is refused (403), and no user is made.
        web = requests.Session()
        signup = f"http://127.0.0.1:{port}/user/signup/"
        web.get(signup, timeout=10)
        form = {
            "email": "stranger@example.org",
            "password": "stranger-pass-123",
            "csrfmiddlewaretoken": web.cookies.get("csrftoken", ""),
        }
        assert web.post(signup, data=form, headers={"Referer": signup}, timeout=10).status_code == 403
        users = requests.get(
            f"http://127.0.0.1:{port}/api/users/",
            headers={"Authorization": f"Token {CREDS.api_key}"},
            timeout=10,
        ).json()
        assert [u["email"] for u in users] == [CREDS.username]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:  # a failed assertion: still stop the server through the command
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 0, out
    assert CREDS.api_key not in out and CREDS.password not in out
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_a_restart_right_after_a_kill_takes_its_port(tmp_path: Path, ls_server: LabelStudioServer) -> None:
    """SIGKILL to the server's process group with a client connected leaves the port in TIME_WAIT
    for a minute; the restart on the same port starts at once instead of calling it busy."""
    data = tmp_path / "ls"
    shutil.copytree(LS_VENV / "avcaps-test-template", data)
    port = free_port()
    first = LabelStudioServer(LS_VENV, data, tmp_path, CREDS, port=port)
    first.start()
    client = requests.Session()
    assert client.get(f"{first.url}/health", timeout=10).ok  # a kept-alive connection
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    client.close()
    states = subprocess.run(["ss", "-tan", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert "TIME-WAIT" in states, states
    again = LabelStudioServer(LS_VENV, data, tmp_path, CREDS, port=port)
    try:
        again.start(wait_s=120)
        assert requests.get(f"{again.url}/health", timeout=10).ok
    finally:
        again.stop()
