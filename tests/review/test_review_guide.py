"""The annotator guide: real AudioCaps captions, linked from the project's instructions, served by the
real Label Studio to the project's members."""

from __future__ import annotations

import csv
import html
import re
from typing import Any

import pytest
import requests

from pipeline.runner import run_stage
from pipeline.stage import RunOptions
from stages.review.client import LabelStudio
from stages.review.connection import read_project_file
from stages.review.guide import EXAMPLES, GUIDE_PATH, guide_html
from stages.review.policy import VERDICTS
from stages.review.push import ReviewStage
from standins.review_run import REPO, TEST_CREDS, make_clips

pytestmark = pytest.mark.slow
LINK = re.compile(r'<a href="([^"]+)"[^>]*>Read the annotator guide</a>')


def test_the_worked_examples_use_real_audiocaps_test_captions() -> None:
    with open(REPO / "manifests" / "audiocaps" / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [ex.verdict for ex in EXAMPLES] == list(VERDICTS)  # one example per verdict
    for ex in EXAMPLES:
        yt, start_ms, end_ms = ex.clip_id.rsplit("_", 2)
        start = int(start_ms) // 1000
        real = [r["caption"] for r in rows if (r["youtube_id"], int(r["start_time"])) == (yt, start)]
        assert sorted(ex.audio_captions) == sorted(real), ex.clip_id  # all of the clip's captions, verbatim
        assert int(end_ms) - int(start_ms) == 10_000
        assert len(ex.proposed) == len(ex.audio_captions)  # one merged line per audio caption
        assert len(ex.final) in (0, len(ex.audio_captions))
    page = guide_html()
    for ex in EXAMPLES:
        for text in (*ex.audio_captions, *ex.proposed, *ex.final):
            assert html.escape(text) in page


def test_the_instructions_link_the_guide_served_to_the_projects_members(run_ctx: Any, ls_server: Any) -> None:
    ctx = run_ctx("run", make_clips(1, "u"))
    run_stage(ReviewStage, ctx, RunOptions(progress=False))
    assert (ctx.workdir / "media" / GUIDE_PATH).read_text() == guide_html()
    c = LabelStudio(ls_server.url, TEST_CREDS.api_key)
    project = c.project(read_project_file(ctx.workdir / "05-review")["project_id"])
    href = LINK.search(project["expert_instruction"])
    assert href and project["show_instruction"]
    url = ls_server.url + html.unescape(href.group(1))
    # A logged-in member gets the page; nobody else does.
    web = requests.Session()
    login = f"{ls_server.url}/user/login/"
    web.get(login, timeout=30)
    form = {
        "email": TEST_CREDS.username,
        "password": TEST_CREDS.password,
        "csrfmiddlewaretoken": web.cookies.get("csrftoken", ""),
    }
    web.post(login, data=form, headers={"Referer": login}, timeout=30)
    r = web.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "Example 3: rejected" in r.text and html.escape(EXAMPLES[1].final[1]) in r.text
    assert requests.get(url, timeout=30).status_code in (302, 401, 403)
    # A guide hosted elsewhere (a team's wiki) is linked instead, on the next push that runs.
    ctx.config.review.guide_url = "https://wiki.example.org/avcaps-guide"  # type: ignore[attr-defined]
    run_stage(ReviewStage, ctx, RunOptions(progress=False, force=True))
    project = c.project(project["id"])
    assert LINK.search(project["expert_instruction"]).group(1) == "https://wiki.example.org/avcaps-guide"  # type: ignore[union-attr]
