"""Label Studio's two kinds of API key, told apart by their form, and the headers they give.

- **Legacy token**: 40 hex characters, sent as ``Authorization: Token <key>``. New organizations
  have them turned off unless an admin enables them (``legacy_api_tokens_enabled``).
- **Personal access token (PAT)**: what Account & Settings shows on a default server. It is a JWT
  *refresh* token (``header.payload.signature``, ``token_type: refresh``). It is never sent to the
  API itself (sent as ``Token`` it gets a 401): ``POST /api/token/refresh/`` with ``{"refresh":
  PAT}`` gives a short-lived access token (5 minutes by default, its ``exp`` claim says), sent as
  ``Authorization: Bearer <access>``.

:class:`TokenAuth` holds the key, gets an access token when needed and renews it ``margin_s`` before
its ``exp`` (read from the token's payload: no signature check is needed to know when our own token
runs out; the server checks the signature), and once more when the server answers 401 anyway (a
clock skew, a server restart with a new secret). ``repr`` and every message hide the key and the
tokens; nothing here logs them.

Why no JWT library: the only thing read from a token is the ``exp``/``token_type`` claims of its
payload, a base64url JSON object; PyJWT would add a dependency for one ``json.loads``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import AbortRun

if TYPE_CHECKING:
    import requests

LEGACY_RE = re.compile(r"[0-9a-fA-F]{40}")
JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
REFRESH_PATH = "/api/token/refresh/"
TokenKind = Literal["legacy", "pat"]
log = logging.getLogger("avcaps")


class AuthError(AbortRun):
    """The key is malformed or the server rejected it; the message never contains it."""


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (only our own token's ``exp`` and ``token_type`` are read)."""
    try:
        payload = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return data if isinstance(data, dict) else {}


def token_kind(key: str, env_name: str = "LABEL_STUDIO_API_KEY") -> TokenKind:
    """``legacy`` (40 hex) or ``pat`` (a JWT refresh token); anything else is a one-line error that
    names the variable, never its value."""
    key = key.strip()
    if LEGACY_RE.fullmatch(key):
        return "legacy"
    if JWT_RE.fullmatch(key):
        kind = jwt_claims(key).get("token_type")
        if kind == "refresh":
            return "pat"
        if kind == "access":
            raise AuthError(
                f"{env_name} holds a short-lived access token; set it to the personal access token "
                "itself (Account & Settings -> Personal Access Token), which the pipeline exchanges "
                "for access tokens as they expire"
            )
        raise AuthError(f"{env_name} looks like a JWT but is not a Label Studio personal access token")
    raise AuthError(
        f"{env_name} is neither a legacy token (40 hex characters) nor a personal access token "
        f"(a JWT, three dot-separated parts); it is {len(key)} characters long"
    )


class TokenAuth:
    """The ``Authorization`` header for one key, with access tokens renewed before they expire."""

    def __init__(
        self,
        key: str,
        env_name: str = "LABEL_STUDIO_API_KEY",
        margin_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key.strip()
        self.kind: TokenKind = token_kind(self._key, env_name)
        self.env_name = env_name
        self.margin_s = margin_s
        self.clock = clock
        self._access: str | None = None
        self._expires_at = 0.0
        self.refreshes = 0  # access tokens obtained

    def __repr__(self) -> str:
        return f"TokenAuth(kind={self.kind!r}, key=***)"

    def secrets(self) -> list[str]:
        """What must never appear in a message (the key and the current access token)."""
        return [s for s in (self._key, self._access) if s]

    def header(self, session: requests.Session, base_url: str, timeout_s: float) -> str:
        """The header value for the next request, renewing the access token first when it is
        missing or expires within ``margin_s``."""
        if self.kind == "legacy":
            return f"Token {self._key}"
        if self._access is None or self.clock() >= self._expires_at - self.margin_s:
            self.refresh(session, base_url, timeout_s)
        return f"Bearer {self._access}"

    def invalidate(self) -> None:
        """Forget the access token (the server refused it): the next header renews it."""
        self._access = None

    def refresh(self, session: requests.Session, base_url: str, timeout_s: float) -> None:
        """Exchange the personal access token for a new access token."""
        import requests

        url = f"{base_url}{REFRESH_PATH}"
        try:
            # No Authorization header: the refresh token in the body is the credential.
            resp = session.post(url, json={"refresh": self._key}, timeout=timeout_s, headers={})
        except requests.ConnectionError:
            raise AuthError(
                f"Label Studio is unreachable at {base_url} (is the server running? `make review-server`)"
            ) from None
        except requests.Timeout:
            raise AuthError(f"Label Studio at {base_url} did not answer {REFRESH_PATH} in time") from None
        if resp.status_code in (400, 401):
            raise AuthError(
                f"Label Studio at {base_url} rejected the personal access token in {self.env_name} "
                f"(HTTP {resp.status_code} from {REFRESH_PATH}): it was revoked, rotated or made on "
                "another server; create a new one in Account & Settings"
            )
        if resp.status_code == 404:
            raise AuthError(
                f"Label Studio at {base_url} has no {REFRESH_PATH} (older than 1.18?): personal access "
                f"tokens need a newer server; use the legacy token in {self.env_name} instead"
            )
        if resp.status_code >= 400:
            raise AuthError(f"Label Studio at {base_url}: {REFRESH_PATH} failed with HTTP {resp.status_code}")
        try:
            access = str(resp.json()["access"])
        except (ValueError, KeyError, TypeError):
            raise AuthError(
                f"Label Studio at {base_url}: {REFRESH_PATH} gave no access token (is this Label Studio?)"
            ) from None
        claims = jwt_claims(access)
        exp, iat = claims.get("exp"), claims.get("iat")
        if isinstance(exp, int | float) and isinstance(iat, int | float):
            # The lifetime counted on our own clock: a skewed clock here cannot make us send an
            # expired token (or renew at every call).
            self._expires_at = self.clock() + float(exp - iat)
        elif isinstance(exp, int | float):
            self._expires_at = float(exp)
        else:
            self._expires_at = float("inf")  # no exp to read: kept until the server refuses it
        self._access = access
        self.refreshes += 1
        # The lifetime only: neither token is ever logged.
        log.debug(
            "Label Studio: new access token from %s, valid %.0f s", base_url, self._expires_at - self.clock()
        )
