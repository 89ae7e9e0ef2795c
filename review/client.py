"""A small client of Label Studio's REST API, in plain HTTP (``requests``).

Why not ``label-studio-sdk``: SDK 2.1.2 requires ``opencv-python-headless>=4.12,<4.13``,
``Pillow>=12.3``, ``pyjwt<2.14``, ``nltk<=3.11``, ``requests-mock==1.12.1``, ``datamodel-code-generator``
and more (checked in its metadata): pins that would constrain the pipeline's main venv (and clash
with vLLM's) for the dozen endpoints used here. The endpoints below are the ones the SDK wraps.

Every failure becomes a :class:`LabelStudioError` whose message names the URL and the thing that
went wrong (unreachable server, rejected key, missing project) and never contains the API key.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pipeline.errors import AbortRun

if TYPE_CHECKING:
    import requests


class LabelStudioError(AbortRun):
    """Label Studio could not do what the pipeline asked; the run cannot go on."""


class ProjectGone(LabelStudioError):
    """The remembered project no longer exists on the server."""


class LabelStudio:
    """One Label Studio server, authenticated with a legacy API token (``Authorization: Token``)."""

    def __init__(self, url: str, api_key: str, timeout_s: float = 60.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Token {api_key}"
        # A proxy from the environment must never see the loopback traffic or the key.
        self._session.trust_env = False

    def close(self) -> None:
        self._session.close()

    # -- plumbing --------------------------------------------------------------------------------
    def request(self, method: str, path: str, gone: str | None = None, **kwargs: Any) -> Any:
        """Call the API; a 404 raises :class:`ProjectGone` with the message ``gone`` when given."""
        import requests

        url = f"{self.url}{path}"
        kwargs.setdefault("timeout", self.timeout_s)
        try:
            resp: requests.Response = self._session.request(method, url, **kwargs)
        except requests.ConnectionError:
            raise LabelStudioError(
                f"Label Studio is unreachable at {self.url} (is the server running? `make review-server`)"
            ) from None
        except requests.Timeout:
            raise LabelStudioError(
                f"Label Studio at {self.url} did not answer {method} {path} in time"
            ) from None
        if resp.status_code == 401:
            raise LabelStudioError(
                f"Label Studio at {self.url} rejected the API key (401): check LABEL_STUDIO_API_KEY "
                "(the admin's legacy token; the server must run with LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN)"
            )
        if resp.status_code == 404 and gone:
            raise ProjectGone(gone)
        if resp.status_code == 403:
            raise LabelStudioError(f"Label Studio at {self.url}: forbidden (403) for {method} {path}")
        if resp.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} failed with HTTP {resp.status_code}: "
                f"{resp.text[:300]}"
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise LabelStudioError(
                f"Label Studio at {self.url}: {method} {path} answered non-JSON (is this Label Studio?)"
            ) from None

    # -- calls -----------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        """The authenticated user; the cheap call that checks the URL and the key."""
        return self.request("GET", "/api/current-user/whoami")  # type: ignore[no-any-return]

    def projects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.request("GET", "/api/projects/", params={"page": page, "page_size": 100})
            out.extend(body["results"])
            if not body.get("next"):
                return out
            page += 1

    def project(self, project_id: int) -> dict[str, Any]:
        gone = f"Label Studio project {project_id} no longer exists at {self.url}"
        return self.request("GET", f"/api/projects/{project_id}/", gone=gone)  # type: ignore[no-any-return]

    def create_project(self, **fields: Any) -> dict[str, Any]:
        return self.request("POST", "/api/projects/", json=fields)  # type: ignore[no-any-return]

    def local_storages(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/storages/localfiles/", params={"project": project_id})  # type: ignore[no-any-return]

    def create_local_storage(self, project_id: int, path: str, title: str) -> dict[str, Any]:
        body = {"project": project_id, "path": path, "title": title, "use_blob_urls": False}
        return self.request("POST", "/api/storages/localfiles/", json=body)  # type: ignore[no-any-return]

    def iter_tasks(
        self, project_id: int, page_size: int = 500, full: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every task of the project, page by page (``full`` adds annotations and predictions)."""
        page = 1
        while True:
            params: dict[str, Any] = {"project": project_id, "page": page, "page_size": page_size}
            if full:
                params["fields"] = "all"
            gone = f"Label Studio project {project_id} no longer exists at {self.url}"
            body = self.request("GET", "/api/tasks/", gone=gone, params=params)
            tasks = body["tasks"] if isinstance(body, dict) else body
            yield from tasks
            total = body.get("total") if isinstance(body, dict) else None
            if not tasks or len(tasks) < page_size or (total is not None and page * page_size >= total):
                return
            page += 1

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
        return self.request("GET", f"/api/tasks/{task_id}/")  # type: ignore[no-any-return]

    def annotations(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", f"/api/tasks/{task_id}/annotations/")  # type: ignore[no-any-return]

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})  # type: ignore[no-any-return]

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/annotations/{annotation_id}/", json={"result": result})  # type: ignore[no-any-return]

    def delete_project(self, project_id: int) -> None:
        self.request("DELETE", f"/api/projects/{project_id}/")
