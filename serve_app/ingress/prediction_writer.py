"""Storing predictions in Label Studio through its API (`POST /api/predictions/`).

Used by the background jobs that finish a "Retrieve predictions" after its answer (serve_app.ingress.jobs)
and by `grounded-serve prelabel`: one writer, so both store the same rows the same way. A prediction is
stored at most once per call: before a retry, the writer asks Label Studio whether the earlier attempt was
stored after all (a read timeout or a 502 can hide a row that was written), so a retry never adds a copy.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import httpx
import orjson

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_studio_auth import LabelStudioAuthError, LabelStudioCredentials
from serve_app.retries import TRANSIENT_STATUS, TransientError, retry_after, with_retries


class PredictionRefused(RuntimeError):
    """Label Studio answered, and said no (a 4xx other than a timeout or rate limit): retrying will not help."""


# (URL to request, extra headers, httpx extensions) for a URL: how the ingress reaches a host it checked
# (ImageFetcher.connect_target). The CLI, told the Label Studio URL by its user, goes by name.
Route = Callable[[str], Awaitable[tuple[str, dict[str, str], dict[str, str]]]]


async def by_name(url: str) -> tuple[str, dict[str, str], dict[str, str]]:
    return url, {}, {}


class PredictionWriter:
    def __init__(self, credentials: LabelStudioCredentials, *, route: Route = by_name, retries: int = 5,
                 timeout_s: float = 30.0, max_delay_s: float = 30.0):
        self.credentials = credentials
        self.route = route
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_delay_s = max_delay_s

    @property
    def base_url(self) -> str:
        return self.credentials.base_url

    def describe(self) -> str:
        return f"{self.base_url} with the {self.credentials.describe()}"

    async def create(self, task_id: int, prediction: dict[str, Any], model_version: str) -> None:
        """Store one prediction of `task_id`. Raises PredictionRefused, or TransientError once retries are spent."""
        body = orjson.dumps({"task": task_id, "result": prediction["result"], "score": prediction.get("score", 0.0),
                             "model_version": model_version}, option=orjson.OPT_SERIALIZE_NUMPY)
        refreshed = False
        tried = False

        async def attempt() -> None:
            nonlocal refreshed, tried
            if tried and await self.stored(task_id, model_version):
                return  # the earlier attempt reached Label Studio after all
            tried = True
            response = await self._request("POST", "/api/predictions/", content=body,
                                           headers={"Content-Type": "application/json"})
            if response.status_code == 401 and self.credentials.is_personal_access_token and not refreshed:
                refreshed = True  # the access token expired early (a clock skew, a restart): exchange it again
                await self._headers(force_refresh=True)
                tried = False  # a 401 stored nothing
                raise TransientError("access token refused", retry_after_s=0)
            if response.status_code in TRANSIENT_STATUS:
                raise TransientError(f"Label Studio answered HTTP {response.status_code}",
                                     retry_after(response.headers.get("retry-after")))
            if response.status_code >= 300:
                raise PredictionRefused(f"Label Studio refused the prediction of task {task_id} "
                                        f"(HTTP {response.status_code}, {self.credentials.describe()}): "
                                        f"{response.text[:300]!r}")

        await with_retries(attempt, self.retries, f"storing the prediction of task {task_id}", self.max_delay_s)

    async def stored(self, task_id: int, model_version: str) -> bool:
        """Whether the task already holds a prediction of `model_version`."""
        response = await self._request("GET", "/api/predictions/", params={"task": task_id})
        if response.status_code in TRANSIENT_STATUS:
            raise TransientError(f"Label Studio answered HTTP {response.status_code}",
                                 retry_after(response.headers.get("retry-after")))
        if response.status_code != 200:
            raise PredictionRefused(f"Label Studio answered HTTP {response.status_code} listing the predictions "
                                    f"of task {task_id} ({self.credentials.describe()})")
        rows = response.json()
        rows = rows.get("results", []) if isinstance(rows, dict) else rows  # paginated or not
        return any(isinstance(row, dict) and row.get("model_version") == model_version for row in rows)

    async def _headers(self, force_refresh: bool = False) -> dict[str, str]:
        try:
            return await self.credentials.headers(force_refresh=force_refresh)
        except LabelStudioAuthError as exc:
            raise PredictionRefused(str(exc)) from None

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.base_url}{path}"
        try:
            target, headers, extensions = await self.route(url)
        except BadRequest as exc:  # the host is not one the service may contact (ImageFetcher's rules)
            raise PredictionRefused(str(exc)) from None
        headers = {**headers, **kwargs.pop("headers", {}), **await self._headers()}
        try:
            return await self.credentials.client.request(method, target, headers=headers, extensions=extensions,
                                                         timeout=self.timeout_s, **kwargs)
        except httpx.HTTPError as exc:  # connect, read, write, pool timeouts and dropped connections
            raise TransientError(f"{exc.__class__.__name__} from {self.base_url}") from None
