"""A small client of Label Studio's REST API, in plain HTTP (``requests``).

Why not ``label-studio-sdk``: SDK 2.1.2 requires ``opencv-python-headless>=4.12,<4.13``,
``Pillow>=12.3``, ``pyjwt<2.14``, ``nltk<=3.11``, ``requests-mock==1.12.1``, ``datamodel-code-generator``
and more (checked in its metadata): pins that would constrain the pipeline's main venv (and clash
with vLLM's) for the dozen endpoints used here. The endpoints below are the ones the SDK wraps.

Every failure becomes a :class:`LabelStudioError` whose message names the URL and the thing that
went wrong (unreachable server, rejected key, missing project) and never contains the API key or an
access token. Keys of both kinds work (:mod:`stages.review.auth`); listings follow the server's paging.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pipeline.errors import AbortRun

if TYPE_CHECKING:
    import requests


class LabelStudioError(AbortRun):
    """Label Studio could not do what the pipeline asked; the run cannot go on."""


class ProjectGone(LabelStudioError):
    """The remembered project no longer exists on the server."""


class LabelStudio:
    """One Label Studio server, authenticated with a legacy token or a personal access token
    (told apart by the key's form: :mod:`stages.review.auth`)."""

    def __init__(
        self,
        url: str,
        api_key: str,
        timeout_s: float = 60.0,
        env_name: str = "LABEL_STUDIO_API_KEY",
        clock: Callable[[], float] = time.time,
    ) -> None:
        import requests

        from stages.review.auth import TokenAuth

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.auth = TokenAuth(api_key, env_name=env_name, clock=clock)
        self.env_name = env_name
        self.retried_401 = 0  # requests sent again after a 401 with a renewed access token
        self._session = requests.Session()
        # A proxy from the environment must never see the loopback traffic or the key.
        self._session.trust_env = False

    def __repr__(self) -> str:
        return f"LabelStudio(url={self.url!r}, auth={self.auth!r})"

    def close(self) -> None:
        self._session.close()

    def _scrub(self, text: str) -> str:
        for secret in self.auth.secrets():
            text = text.replace(secret, "***")
        return text

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        import requests

        url = f"{self.url}{path}"
        kwargs.setdefault("timeout", self.timeout_s)
        headers = {"Authorization": self.auth.header(self._session, self.url, self.timeout_s)}
        try:
            return self._session.request(method, url, headers=headers, **kwargs)
        except requests.ConnectionError:
            raise LabelStudioError(
                f"Label Studio is unreachable at {self.url} (is the server running? `make review-server`)"
            ) from None
        except requests.Timeout:
            raise LabelStudioError(
                f"Label Studio at {self.url} did not answer {method} {path} in time"
            ) from None

    def request(self, method: str, path: str, gone: str | None = None, **kwargs: Any) -> Any:
        """Call the API; a 404 raises :class:`ProjectGone` with the message ``gone`` when given.

        With a personal access token, a 401 renews the access token and sends the request once more
        (the server refused it before doing anything, so even a POST is safe to repeat).
        """
        resp = self._send(method, path, **kwargs)
        if resp.status_code == 401 and self.auth.kind == "pat":
            self.auth.invalidate()
            self.retried_401 += 1
            resp = self._send(method, path, **kwargs)
        if resp.status_code == 401:
            if self.auth.kind == "legacy":
                raise LabelStudioError(
                    f"Label Studio at {self.url} rejected the legacy token in {self.env_name} (401): "
                    "check it, or the server has legacy tokens turned off (the default for new "
                    "organizations): then set it to your personal access token (Account & Settings)"
                )
            raise LabelStudioError(
                f"Label Studio at {self.url} refused {method} {path} (401) with a fresh access token "
                f"from the personal access token in {self.env_name}: does this user still exist and "
                "belong to the organization?"
            )
        if resp.status_code == 404 and gone:
            raise ProjectGone(gone)
        if resp.status_code == 403:
            raise LabelStudioError(f"Label Studio at {self.url}: forbidden (403) for {method} {path}")
        if resp.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} failed with HTTP {resp.status_code}: "
                f"{self._scrub(resp.text[:300])}"
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} answered non-JSON (is this Label Studio?)"
            ) from None

    def _pages(self, path: str, params: dict[str, Any], key: str, gone: str | None = None) -> Iterator[Any]:
        """Every item of a paged listing, however the server pages it: its ``next`` links
        (Django REST framework; only their query is used, so a server that builds them with
        another host name is still asked through ``self.url``), else its ``total``/``count``
        until every item came, else until a page is shorter than the first. The server may
        cap the page size below the one asked (``TASK_API_PAGE_SIZE_MAX``); nothing here assumes
        it gave what was asked."""
        params = dict(params)
        seen, first_len = 0, None
        while True:
            try:
                body = self.request("GET", path, gone=gone, params=params)
            except ProjectGone:
                if seen:  # the listing shrank under us (tasks deleted): past the last page
                    return
                raise
            if isinstance(body, list):  # a server that does not page this listing
                yield from body
                return
            items = body.get(key)
            if items is None:
                items = body.get("results") or []
            yield from items
            seen += len(items)
            first_len = len(items) if first_len is None else first_len
            if "next" in body:
                if not body["next"]:
                    return
                params.update({k: v[-1] for k, v in parse_qs(urlsplit(str(body["next"])).query).items()})
                continue
            total = body.get("total", body.get("count"))
            if not items or (total is not None and seen >= int(total)):
                return
            if total is None and len(items) < first_len:
                return
            params["page"] = int(params.get("page", 1)) + 1

    # -- calls -----------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        """The authenticated user; the cheap call that checks the URL and the key."""
        return self.request("GET", "/api/current-user/whoami")

    def projects(self) -> list[dict[str, Any]]:
        return list(self._pages("/api/projects/", {"page": 1, "page_size": 100}, "results"))

    def project(self, project_id: int) -> dict[str, Any]:
        gone = f"Label Studio project {project_id} no longer exists at {self.url}"
        return self.request("GET", f"/api/projects/{project_id}/", gone=gone)

    def create_project(self, **fields: Any) -> dict[str, Any]:
        return self.request("POST", "/api/projects/", json=fields)

    def local_storages(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/storages/localfiles/", params={"project": project_id})

    def create_local_storage(self, project_id: int, path: str, title: str) -> dict[str, Any]:
        body = {"project": project_id, "path": path, "title": title, "use_blob_urls": False}
        return self.request("POST", "/api/storages/localfiles/", json=body)

    def iter_tasks(
        self, project_id: int, page_size: int = 500, full: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project, page by page (``full`` adds annotations and predictions).

        The task listing gives ``total`` and no ``next`` link: pages are asked until ``total``
        tasks came, whatever size the server gave each page."""
        params: dict[str, Any] = {"project": project_id, "page": 1, "page_size": page_size}
        if full:
            params["fields"] = "all"
        gone = f"Label Studio project {project_id} no longer exists at {self.url}"
        yield from self._pages("/api/tasks/", params, "tasks", gone=gone)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (with inline predictions); returns their ids in the order given."""
        body = self.request(
            "POST",
            f"/api/projects/{project_id}/import",
            gone=f"Label Studio project {project_id} no longer exists at {self.url}",
            params={"return_task_ids": "true"},
            json=tasks,
        )
        ids = [int(i) for i in body.get("task_ids") or []]
        if len(ids) != len(tasks):
            raise LabelStudioError(
                f"Label Studio at {self.url}: imported {len(tasks)} tasks into project {project_id} "
                f"but got {len(ids)} task ids back"
            )
        return ids

    def task(self, task_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/tasks/{task_id}/")

    def update_task(self, task_id: int, data: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/tasks/{task_id}/", json={"data": data})

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions/", params={"task": task_id})

    def create_prediction(self, task_id: int, prediction: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/predictions/", json={"task": task_id, **prediction})

    def delete_prediction(self, prediction_id: int) -> None:
        self.request("DELETE", f"/api/predictions/{prediction_id}/")

    def annotations(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/tasks/{task_id}/annotations/")

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/annotations/{annotation_id}/", json={"result": result})

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        gone = f"Label Studio project {project_id} no longer exists at {self.url}"
        return self.request("PATCH", f"/api/projects/{project_id}/", gone=gone, json=fields)

    def users(self) -> list[dict[str, Any]]:
        return list(self._pages("/api/users/", {}, "results"))

    def delete_project(self, project_id: int) -> None:
        self.request("DELETE", f"/api/projects/{project_id}/")
