"""Stage 1's limits: one pace and one circuit breaker for every download start of a run folder on a
host, and a time bound on each clip.

**The start gate** (:class:`StartGate`). Every download start, in any thread, process, shard or
Ray worker of this host working on the run folder, goes through one small state file,
``DIR/01-download/limits/<host>.json``, read and written under a lock (``filelock``, flock; the
library the stage locks already use). It holds:

- the pace: the next free start time. Starts are spaced evenly, ``max(delay_s, 3600 /
  max_per_hour)`` seconds apart plus ``0..jitter_s``, so the host never exceeds ``max_per_hour``
  and never bursts (a sliding-window limiter would allow ``max_per_hour`` starts back to back at
  the top of each window, which is what trips a bot check);
- the circuit breaker: when rate-limit failures (``bot_check``, ``http_429``, ``rate_limited``)
  reach ``threshold`` within ``window_s``, no download starts for a cool-down; then one start,
  the probe, goes alone. A probe that is not rate-limited closes the breaker; one that is opens a
  cool-down twice as long. After ``max_cooldowns`` cool-downs whose probes failed, every start
  raises :class:`~pipeline.errors.RunThrottled` (exit 4): the run stops, committing what finished;
  clips that were waiting never reached the source, so they keep their attempts.

One state per host, not per run folder: a run folder on a shared filesystem worked on from several
hosts gets one pace and one breaker per host (per address, which is what YouTube counts). Hosts
that share one public address (NAT) should divide ``max_per_hour`` between them.

Why not ``pyrate-limiter`` (SQLite/file-lock buckets): the breaker and the pace must be decided
together, under one lock, at each start (a start reserved before a trip must not go out during the
cool-down), which its bucket cannot hold; its sliding window allows bursts; it has no jitter; and
its API broke twice in two years (3.0, 4.0).

**The clip deadline** (:class:`ClipDeadline`). yt-dlp cuts the section with ffmpeg, whose read
timeout never fires while a source trickles. Past ``clip_timeout_s`` the deadline kills this
clip's ffmpeg processes (children of this process whose command line holds the clip's unique temp
name, found with ``psutil``) until yt-dlp gives up; the stage then fails the clip ``slow_transfer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import RunThrottled
from pipeline.io import clean_temp_files, temp_name

log = logging.getLogger("avcaps")

# Failures that mean the source is refusing this address, not this clip.
RATE_LIMIT_REASONS = frozenset({"bot_check", "http_429", "rate_limited"})

FIXES = (
    "export cookies of a logged-in browser session (download.cookies_file), install the PO-token "
    "provider plugin (pip install bgutil-ytdlp-pot-provider, with its server running), lower "
    "download.max_per_hour, or use another address (download.proxy, or shard across hosts)"
)


class GateCancelled(Exception):
    """The stage is stopping (Ctrl-C, SIGTERM): a waiting start gives up its place."""


@dataclass(frozen=True)
class GateSettings:
    gap_s: float = 0.0  # least time between two starts on this host
    jitter_s: float = 0.0
    threshold: int = 5  # rate-limit failures within window_s that trip the breaker
    window_s: float = 300.0
    cooldown_s: float = 600.0  # the first cool-down; each next one is twice as long
    max_cooldowns: int = 3
    probe_timeout_s: float = 300.0  # a probe not reported by then (its process died) is void

    @classmethod
    def of(cls, cfg: Any) -> GateSettings:
        """From a ``download`` config section."""
        per_hour = 3600.0 / cfg.max_per_hour if cfg.max_per_hour else 0.0
        return cls(
            gap_s=max(cfg.delay_s, per_hour),
            jitter_s=cfg.jitter_s,
            threshold=cfg.breaker_threshold,
            window_s=cfg.breaker_window_s,
            cooldown_s=cfg.breaker_cooldown_s,
            max_cooldowns=cfg.breaker_max_cooldowns,
            probe_timeout_s=cfg.clip_timeout_s + cfg.socket_timeout_s + 60.0,
        )


@dataclass
class Ticket:
    """A granted start. ``probe``: the one start allowed after a cool-down."""

    token: str
    probe: bool = False


def _fresh_state() -> dict[str, Any]:
    return {
        "next_start": 0.0,
        "failures": [],  # times of recent rate-limit failures
        "open_until": None,  # set while the breaker is open or half-open (cooling down / probing)
        "cooldowns": 0,  # cool-downs since the breaker last closed
        "probe": None,  # {"token", "at"} of the probe in flight
        "gave_up_at": None,
        # Totals, for stats.json and `avcaps status`.
        "starts": 0,
        "trips": 0,
        "cooldowns_total": 0,
        "cooldown_s_total": 0.0,
        "last_trip_at": None,
        "gave_ups": 0,
    }


def host_name() -> str:
    return socket.gethostname().replace("/", "_") or "host"


@dataclass
class StartGate:
    """The pace and circuit breaker in front of every download start (see the module docstring)."""

    folder: Path
    settings: GateSettings
    host: str = field(default_factory=host_name)

    def __post_init__(self) -> None:
        from filelock import FileLock

        self.folder.mkdir(parents=True, exist_ok=True)
        clean_temp_files(self.folder, recursive=False)  # a state write a crash interrupted
        self.path = self.folder / f"{self.host}.json"
        # thread_local=False: one lock object shared by this stage's threads (each acquire is
        # also serialized in-process by _mutex); other processes are kept out by flock.
        self._flock = FileLock(self.folder / f"{self.host}.lock", thread_local=False)
        self._mutex = threading.Lock()
        self._cancel = threading.Event()
        self.created = time.time()
        self._rng = random.Random()
        s = self.settings
        self._poll_s = min(1.0, max(0.05, s.cooldown_s / 10))

    # -- the state file ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """The state, locked against every other start on this host; saved when the block ends."""
        with self._mutex, self._flock:
            state = read_state(self.path)
            yield state
            tmp = self.path.with_name(temp_name(self.path.name))
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)  # no fsync: losing the pace in a power cut is harmless

    def cancel(self) -> None:
        """Wake every waiting start and make it give up (the stage is stopping)."""
        self._cancel.set()

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self._cancel.wait(seconds):
            raise GateCancelled()
        if self._cancel.is_set():
            raise GateCancelled()

    def _gave_up(self, state: dict[str, Any]) -> bool:
        """Whether the breaker gave up while this run was working (a later run starts afresh)."""
        return state["gave_up_at"] is not None and state["gave_up_at"] >= self.created

    # -- one start ----------------------------------------------------------------------------------
    def acquire(self) -> Ticket:
        """Wait for this host's next free start (and for the breaker); raise RunThrottled when the
        breaker gave up."""
        s = self.settings
        while True:
            with self._state() as st:
                now = time.time()
                if self._gave_up(st):
                    raise RunThrottled(give_up_message(st, s))
                token = uuid.uuid4().hex
                probe = False
                wait = 0.0
                if st["open_until"] is not None:
                    probing = st["probe"] is not None and now - st["probe"]["at"] < s.probe_timeout_s
                    if now < st["open_until"]:
                        wait = min(st["open_until"] - now, 5.0)
                    elif probing:
                        wait = self._poll_s
                    else:
                        probe = True
                if not wait:
                    slot = max(now, st["next_start"])
                    jitter = self._rng.uniform(0, s.jitter_s) if s.jitter_s else 0.0
                    st["next_start"] = slot + s.gap_s + jitter
                    if probe:
                        st["probe"] = {"token": token, "at": slot}
            if wait:
                self._sleep(wait)
                continue
            self._sleep(slot - now)
            if probe:
                return Ticket(token, probe=True)
            with self._state() as st:
                # The breaker may have tripped while this start waited for its slot.
                if st["open_until"] is None and not self._gave_up(st):
                    st["starts"] += 1
                    return Ticket(token)

    def report(self, ticket: Ticket, reason: str | None) -> None:
        """Record how a start ended: ``reason`` is the failure reason, or None for a success."""
        s = self.settings
        limited = reason in RATE_LIMIT_REASONS
        with self._state() as st:
            now = time.time()
            if limited:
                st["failures"] = [t for t in st["failures"] if now - t < s.window_s] + [now]
            own_probe = ticket.probe and st["probe"] is not None and st["probe"]["token"] == ticket.token
            if own_probe:
                st["probe"] = None
                st["starts"] += 1
                if not limited:
                    log.warning("01-download: the probe got through (%s): downloads resume", reason or "ok")
                    st.update(open_until=None, cooldowns=0, failures=[], gave_up_at=None)
                elif st["cooldowns"] >= s.max_cooldowns:
                    st["gave_up_at"] = now
                    st["open_until"] = now  # a later run starts with a probe
                    st["gave_ups"] += 1  # the run log says why, from the RunThrottled
                else:
                    self._open(st, now, f"the probe failed ({reason})")
            elif limited and st["open_until"] is None and len(st["failures"]) >= s.threshold:
                st["trips"] += 1
                st["last_trip_at"] = now
                why = f"{len(st['failures'])} rate-limit failures in {s.window_s:g} s ({reason})"
                self._open(st, now, why)

    def _open(self, st: dict[str, Any], now: float, why: str) -> None:
        s = self.settings
        st["cooldowns"] += 1
        st["cooldowns_total"] += 1
        length = s.cooldown_s * 2 ** (st["cooldowns"] - 1)
        st["cooldown_s_total"] += length
        st["open_until"] = now + length
        log.warning(
            "01-download: %s: no download starts for %.3g s (cool-down %d of %d), then one probe",
            why,
            length,
            st["cooldowns"],
            s.max_cooldowns,
        )


def read_state(path: Path) -> dict[str, Any]:
    """A gate's state file (a fresh state when absent or unreadable: a damaged file is named in the
    log and rewritten whole by the next start; the pace and breaker start afresh)."""
    state = _fresh_state()
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        state.update(saved)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, TypeError) as exc:
        log.warning("%s: unreadable (%s): the pace and breaker of this host start afresh", path, exc)
        return _fresh_state()
    return state


def give_up_message(st: dict[str, Any], s: GateSettings) -> str:
    lengths = ", ".join(f"{s.cooldown_s * 2**k:g}" for k in range(s.max_cooldowns))
    return (
        f"the source kept refusing this host (bot checks / HTTP 429 / rate limits) through "
        f"{s.max_cooldowns} cool-downs ({lengths} s): stopped so the address can recover "
        f"(exit {RunThrottled.exit_code}); clips not tried keep their attempts. Fixes: {FIXES}; "
        "then rerun (it starts with one probe)"
    )


def breaker_summary(folder: Path) -> dict[str, Any]:
    """Per host: the breaker's totals and where it stands, for stats.json and `avcaps status`."""
    out: dict[str, Any] = {}
    if not folder.is_dir():
        return out
    now = time.time()

    def when(t: float | None) -> str | None:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None

    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):  # a temp file
            continue
        st = read_state(path)
        if st["gave_up_at"] is not None:
            state = "gave_up"
        elif st["open_until"] is None:
            state = "closed"
        elif now < st["open_until"]:
            state = "cooling_down"
        else:
            state = "probing"
        out[path.stem] = {
            "state": state,
            "starts": st["starts"],
            "trips": st["trips"],
            "cooldowns": st["cooldowns_total"],
            "cooldown_s": round(st["cooldown_s_total"], 1),
            "last_trip_at": when(st["last_trip_at"]),
            "gave_up_at": when(st["gave_up_at"]),
            "gave_ups": st["gave_ups"],
        }
    return out


class ClipDeadline:
    """A wall-clock bound on one clip's download: past ``seconds``, kill the child processes of
    this process whose command line holds ``marker`` (the clip's unique temp name), again every
    0.2 s until the block ends (yt-dlp may retry)."""

    def __init__(self, marker: str, seconds: float) -> None:
        self.marker = marker
        self.seconds = seconds
        self.start = time.monotonic()
        self.killed = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"deadline-{marker[-24:]}", daemon=True)

    def __enter__(self) -> ClipDeadline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def expired(self) -> bool:
        return self.elapsed >= self.seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return max(0.0, self.seconds - self.elapsed)

    def _watch(self) -> None:
        if self._done.wait(self.seconds):
            return
        while True:
            self.killed += kill_children(self.marker)
            if self._done.wait(0.2):
                return


def kill_children(marker: str) -> int:
    """Kill this process's descendants whose command line contains ``marker``; how many."""
    import psutil

    n = 0
    for child in psutil.Process().children(recursive=True):
        try:
            if any(marker in arg for arg in child.cmdline()):
                child.kill()
                n += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return n
