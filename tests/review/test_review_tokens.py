"""Both kinds of Label Studio key against the real server: the form tells the kind, access tokens
are renewed before they expire and once on a 401, and no key or token is ever logged."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import requests

from pipeline.runner import run_stage
from pipeline.selection import stage_ledger
from pipeline.stage import RunOptions
from stages.review.auth import AuthError, TokenAuth, jwt_claims, token_kind
from stages.review.client import LabelStudio
from stages.review.labeling import verdict_result
from stages.review.pull import pull, read_reviews
from stages.review.push import ReviewStage
from standins.review_run import TEST_CREDS as CREDS
from standins.review_run import make_clips

pytestmark = pytest.mark.slow


def test_the_key_form_tells_the_kind(ls_server: Any, admin_pat: str) -> None:
    assert token_kind(CREDS.api_key) == "legacy"
    assert token_kind(admin_pat) == "pat" and jwt_claims(admin_pat)["token_type"] == "refresh"
    access = requests.post(f"{ls_server.url}/api/token/refresh/", json={"refresh": admin_pat}, timeout=30)
    access_token = access.json()["access"]
    with pytest.raises(AuthError, match="short-lived access token") as exc:
        token_kind(access_token)
    assert access_token not in str(exc.value)
    for bad in ("not-a-key", CREDS.api_key[:-1], admin_pat.replace(".", "", 1)):
        with pytest.raises(AuthError, match="MY_KEY is neither") as exc:
            token_kind(bad, "MY_KEY")
        assert bad not in str(exc.value)
    assert "key=***" in repr(TokenAuth(admin_pat))
    assert admin_pat not in repr(LabelStudio("http://x", admin_pat))


def test_access_token_renewed_before_expiry_and_once_on_401(
    ls_server: Any, admin_pat: str, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (None, "avcaps", "urllib3"):  # debug from us and from urllib3: no secret in any
        caplog.set_level(logging.DEBUG, logger=name)
    now = [time.time()]
    c = LabelStudio(ls_server.url, admin_pat, clock=lambda: now[0])
    assert c.whoami()["email"] == CREDS.username
    c.whoami()
    assert (c.auth.refreshes, c.retried_401) == (1, 0)  # one access token, reused
    first = c.auth.secrets()[1]
    claims = jwt_claims(first)
    lifetime = claims["exp"] - claims["iat"]
    assert 60 <= lifetime <= 3600  # Label Studio's default is 5 minutes
    # Just inside the renewal margin of its lifetime: a new token is fetched *before* the call,
    # so the server never sees an expired one (no 401, no retry).
    now[0] += lifetime - c.auth.margin_s + 1
    assert c.whoami()["email"] == CREDS.username
    assert (c.auth.refreshes, c.retried_401) == (2, 0)
    second = c.auth.secrets()[1]
    assert second != first
    # The server refuses the token we hold (say, restarted with a new secret): renewed once, and
    # the same call goes through.
    c.auth._access = second[:-6] + ("AAAAAA" if not second.endswith("AAAAAA") else "BBBBBB")
    assert c.projects() is not None
    assert (c.auth.refreshes, c.retried_401) == (3, 1)
    secrets = {admin_pat, first, second, c.auth.secrets()[1], CREDS.api_key}
    assert "new access token from" in caplog.text and "Starting new HTTP connection" in caplog.text
    assert not any(s in caplog.text for s in secrets)


def test_push_and_pull_with_a_personal_access_token(
    run_ctx: Any, admin_pat: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    clips = make_clips(3, "t")
    ctx = run_ctx("run", clips)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", admin_pat)
    assert run_stage(ReviewStage, ctx, RunOptions(progress=False)).counts == {"ok": 3}
    ids = stage_ledger(ReviewStage(ctx)).latest()["ls_task_id"]
    c = LabelStudio(ctx.config.review.url, admin_pat)  # type: ignore[attr-defined]
    for tid in ids:
        c.create_annotation(int(tid), [verdict_result("accept")])
    assert pull(ctx).counts == {"accept": 3}
    assert set(read_reviews(ctx.workdir)["annotator"]) == {CREDS.username}
    # The same project through the legacy key: both kinds reach the same user and data.
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", CREDS.api_key)
    assert pull(ctx).counts == {"accept": 3}
