"""Stage 5 against a team's server as a default Label Studio is set up: personal access tokens only
(legacy tokens off), task pages capped by the server (``TASK_API_PAGE_SIZE_MAX``), shards pushing
the same run at once. Every command runs as a user runs it: ``avcaps`` in a process of its own."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
from review_helpers import TEAM_PAGE_SIZE_MAX, TeamServer, avcaps, popen_avcaps, write_config

from pipeline.selection import stage_ledger
from stages.review.auth import AuthError
from stages.review.client import LabelStudio
from stages.review.connection import read_project_file
from stages.review.labeling import text_result, verdict_result
from stages.review.push import ReviewStage
from standins.review_run import TEST_CREDS as CREDS
from standins.review_run import make_clips

pytestmark = pytest.mark.slow
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def pushed(workdir: Path) -> pd.DataFrame:
    return stage_ledger(ReviewStage, workdir).latest()


def texts_under(folder: Path) -> str:
    """Every file of the run folder, read as text (logs, configs, stats, Parquet bytes too)."""
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def test_push_pull_status_with_a_personal_access_token_and_no_secret_anywhere(
    team_run: Any, team_server: TeamServer
) -> None:
    n = 3 * TEAM_PAGE_SIZE_MAX + 1  # more tasks than three of the server's pages
    clips = make_clips(n, "j")
    ctx = team_run("run", clips)
    config = str(write_config(ctx))
    outputs = []

    def run(*args: str) -> str:
        proc = avcaps(["-v", *args, "--config", config], team_server.pat)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("run", "review", "--no-progress")
    state = pushed(ctx.workdir)
    assert (state["status"] == "ok").sum() == n
    c = LabelStudio(team_server.url, team_server.pat)
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    # The server really pages below what is asked: one page holds TEAM_PAGE_SIZE_MAX tasks.
    raw = c.request("GET", "/api/tasks/", params={"project": project_id, "page_size": 500})
    assert (len(raw["tasks"]), raw["total"]) == (TEAM_PAGE_SIZE_MAX, n)
    edit = ["A brown dog barks at two birds", "Two birds chirp near a barking dog"]
    for i, tid in enumerate(state["ls_task_id"]):
        result = [verdict_result("edited"), text_result(edit)] if i == n - 1 else [verdict_result("accept")]
        c.create_annotation(int(tid), result)  # the last task is on the last page

    out = run("review", "pull")
    assert f"pulled {n} reviewed clips of {n} tasks" in out
    status = json.loads(run("review", "status", "--json"))
    assert (status["done"], status["total"], status["counts"]["edited"]) == (n, n, 1)
    # Pushing again (forced) lists every page first, so it imports nothing a second time.
    run("run", "review", "--force", "--no-progress")
    tasks = list(c.iter_tasks(project_id))
    assert len(tasks) == n and len({t["data"]["clip_id"] for t in tasks}) == n

    # Neither the key nor any token (a JWT of any kind) in any output, log or file of the run,
    # nor in the server's log, with debug logging on.
    everything = "\n".join(outputs) + texts_under(ctx.workdir) + team_server.server.log_path.read_text()
    # Each process that talked to the server got its own access token (status reads files only).
    assert ["new access token from" in out for out in outputs] == [True, True, False, True]
    assert team_server.pat not in everything and CREDS.api_key not in everything
    found = JWT.search(everything)
    assert not found, f"a JWT at offset {found.start() if found else 0} of the outputs"  # not the JWT itself


def test_the_legacy_key_refused_by_the_team_server_names_the_way_out(
    team_run: Any, team_server: TeamServer
) -> None:
    ctx = team_run("run", make_clips(1, "l"))
    proc = avcaps(["run", "review", "--config", str(write_config(ctx))], CREDS.api_key)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert "rejected the legacy token in LABEL_STUDIO_API_KEY (401)" in err
    assert "personal access token" in err and CREDS.api_key not in proc.stderr + proc.stdout


def test_listings_follow_the_servers_pages(team_run: Any, team_server: TeamServer) -> None:
    ctx = team_run("run", make_clips(2 * TEAM_PAGE_SIZE_MAX + 2, "g"))
    assert avcaps(["run", "review", "--config", str(write_config(ctx))], team_server.pat).returncode == 0
    c = LabelStudio(team_server.url, team_server.pat)
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    want = sorted(int(t) for t in pushed(ctx.workdir)["ls_task_id"])
    for size in (1, 2, 500):  # below, at and above the server's cap
        assert sorted(int(t["id"]) for t in c.iter_tasks(project_id, page_size=size)) == want
    # Projects page with `next` links (Django REST framework): followed through our own URL.
    every = [p["id"] for p in c.projects()]
    one_by_one = [p["id"] for p in c._pages("/api/projects/", {"page": 1, "page_size": 1}, "results")]
    assert len(every) >= 2 and one_by_one == every


def test_four_shards_push_the_same_run_at_once(team_run: Any, team_server: TeamServer) -> None:
    clips = make_clips(16, "h")
    ctx = team_run("run", clips)
    config = str(write_config(ctx))
    args = ["run", "review", "--config", config, "--no-progress", "--shard"]
    procs = [popen_avcaps([*args, f"{i}/4"], team_server.pat) for i in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-2000:] for _, err in results]
    state = pushed(ctx.workdir)
    project_id = read_project_file(ctx.workdir / "05-review")["project_id"]
    assert (state["status"] == "ok").all() and len(state) == 16
    assert set(state["ls_project_id"].astype(int)) == {project_id}  # one project for all shards
    c = LabelStudio(team_server.url, team_server.pat)
    title = read_project_file(ctx.workdir / "05-review")["title"]
    assert [p["id"] for p in c.projects() if p["title"] == title] == [project_id]
    tasks = list(c.iter_tasks(project_id))
    assert sorted(t["data"]["clip_id"] for t in tasks) == sorted(x["clip_id"] for x in clips)  # each once
    assert sorted(int(t["id"]) for t in tasks) == sorted(int(t) for t in state["ls_task_id"])
    storages = c.local_storages(project_id)
    assert len(storages) == 1  # the media folder attached once


def test_a_rotated_token_is_named_and_not_retried_forever(team_server: TeamServer) -> None:
    """Runs last in this module: it rotates the team admin's token (and keeps the new one)."""
    old = team_server.pat
    c = LabelStudio(team_server.url, old)
    c.whoami()
    access = c.auth.secrets()[1]
    r = requests.post(
        f"{team_server.url}/api/token/rotate/",
        headers={"Authorization": f"Bearer {access}"},
        json={"refresh": old},
        timeout=30,
    )
    assert r.status_code == 200, r.text[:200]
    team_server.pat = r.json()["refresh"]
    # A new process with the old token: one refresh, refused, named; the token is not in it.
    fresh = LabelStudio(team_server.url, old)
    with pytest.raises(AuthError, match="rejected the personal access token in LABEL_STUDIO_API_KEY") as exc:
        fresh.whoami()
    assert old not in str(exc.value) and fresh.auth.refreshes == 0
    # A running process holding an access token: fine until it must renew, then the same error.
    c.auth._expires_at = 0
    with pytest.raises(AuthError, match="revoked, rotated"):
        c.whoami()
    assert LabelStudio(team_server.url, team_server.pat).whoami()["email"] == CREDS.username
