"""Starts the real Label Studio server (from its own venv, ``make review-venv``) on 127.0.0.1.

The server's pins (openai<2, pyarrow<25, ...) clash with the pipeline's, so it lives in
``.venv-labelstudio`` and runs as a child process. Its SQLite data dir sits in the run folder, the
admin user and API key come from environment variables, signup without an invite link is off, and
analytics, Sentry and the update check are off, so it sends nothing off this machine.

Pitfalls handled here (measured, see FACTS.md): without ``--internal-host`` it binds 0.0.0.0; a busy
port makes it silently take the next one (so the port is checked first, binding as the server does,
and the server is polled on the port asked for); bare ``USERNAME``/``PASSWORD``/``PORT``/``HOST``
variables are read too (so the child gets a clean environment); the legacy token only works when
enabled at data-dir creation.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import AbortRun

USERNAME_ENV = "LABEL_STUDIO_USERNAME"
PASSWORD_ENV = "LABEL_STUDIO_PASSWORD"
API_KEY_ENV = "LABEL_STUDIO_API_KEY"
TOKEN_RE = re.compile(r"[0-9a-f]{40}")
# Only these outer variables reach the server; everything else (USERNAME, PORT, HOST, proxies...) is
# dropped because Label Studio reads some bare names as its own settings.
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")


@dataclass(frozen=True)
class Credentials:
    """The admin login and API key (a 40-hex legacy token). ``repr`` hides the secrets."""

    username: str
    password: str
    api_key: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***, api_key=***)"


def credentials_from_env(env: dict[str, str] | None = None, api_key_env: str = API_KEY_ENV) -> Credentials:
    env = dict(os.environ if env is None else env)
    missing = [n for n in (USERNAME_ENV, PASSWORD_ENV, api_key_env) if not env.get(n)]
    if missing:
        raise AbortRun(
            "set "
            + ", ".join(missing)
            + " in the environment (admin e-mail, password, and a 40-hex API key, "
            "e.g. `export LABEL_STUDIO_API_KEY=$(openssl rand -hex 20)`)"
        )
    creds = Credentials(env[USERNAME_ENV], env[PASSWORD_ENV], env[api_key_env])
    if not TOKEN_RE.fullmatch(creds.api_key):
        raise AbortRun(
            f"{api_key_env} must be 40 lowercase hex characters (e.g. `openssl rand -hex 20`): the local "
            "server installs it as the admin's legacy token (a personal access token is for pushing to "
            "a server that already runs)"
        )
    if "@" not in creds.username:
        raise AbortRun(f"{USERNAME_ENV} must be an e-mail address (Label Studio logs users in by e-mail)")
    return creds


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now. The test binds as the server will (Django's
    runserver sets SO_REUSEADDR): a port held only by connections in TIME_WAIT, as a server killed
    mid-request leaves it for a minute, is free; one where something listens is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_env(creds: Credentials, data_dir: Path, document_root: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir.resolve()),
            "LABEL_STUDIO_USERNAME": creds.username,
            "LABEL_STUDIO_PASSWORD": creds.password,
            "LABEL_STUDIO_USER_TOKEN": creds.api_key,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root.resolve()),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


class LabelStudioServer:
    """One Label Studio process; :meth:`start` waits until it answers, :meth:`stop` ends it by PID."""

    def __init__(
        self,
        venv: Path,
        data_dir: Path,
        document_root: Path,
        creds: Credentials,
        host: str = "127.0.0.1",
        port: int = 8080,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.venv = Path(venv)
        self.data_dir = Path(data_dir)
        self.document_root = Path(document_root)
        self.creds = creds
        self.host = host
        self.port = port
        # Further server settings (e.g. TASK_API_PAGE_SIZE_MAX, as a team's server may set it).
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def executable(self) -> Path:
        exe = (self.venv / "bin" / "label-studio").absolute()
        if not exe.exists():
            raise AbortRun(f"Label Studio is not installed in {self.venv}: run `make review-venv` first")
        return exe

    def start(self, wait_s: float = 300.0) -> None:
        exe = self.executable()
        if not port_is_free(self.host, self.port):
            # Label Studio would silently move to the next port; refuse instead.
            raise AbortRun(f"port {self.port} on {self.host} is busy: choose another (review.url / --port)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(exe), "start", "--no-browser", "--internal-host", self.host, "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=server_env(self.creds, self.data_dir, self.document_root) | self.extra_env,
                cwd=self.data_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() ends its children too
            )
        try:
            self._wait_ready(wait_s)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, wait_s: float) -> None:
        import requests

        deadline = time.monotonic() + wait_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AbortRun(
                    f"Label Studio exited with code {self.proc.returncode} while starting; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{self.url}/health", timeout=2)
                if r.ok:
                    return
            time.sleep(0.5)
        raise AbortRun(f"Label Studio did not answer on {self.url} within {wait_s:.0f}s; see {self.log_path}")

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        except FileNotFoundError:
            return ""
        return "\n".join(lines).replace(self.creds.api_key, "***").replace(self.creds.password, "***")

    def stop(self, timeout_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)

    def __enter__(self) -> LabelStudioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_template(venv: Path, dest: Path, creds: Credentials, document_root: Path) -> Path:
    """A migrated data dir (admin user and token made) in ``dest``, built once: a copy starts in ~4 s
    instead of ~60 s of migrations. Built under a temporary name and renamed (the rename commits)."""
    if (dest / "label_studio.sqlite3").exists():
        return dest
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with LabelStudioServer(venv, tmp, document_root, creds, port=free_port()):
        pass
    (tmp / "server.log").unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(dest)
    except OSError:  # built meanwhile by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
