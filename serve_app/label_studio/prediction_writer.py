"""Storing predictions in Label Studio through its API: in bulk (`POST /api/projects/{id}/import/predictions`), or
one at a time (`POST /api/predictions/`) where Label Studio refuses the bulk call.

Used by the background jobs that finish a "Retrieve predictions" after its answer (serve_app.ingress.jobs)
and by `grounded-serve prelabel`: one writer, so both store the same rows the same way.

Exactly once, when a write's fate is unknown: before a retry, the writer asks Label Studio whether the earlier
attempt was stored after all (a read timeout or a 502 can hide a row that was written), and only rows of this task
and this model version count. Label Studio can still commit the first attempt after that check said no (it was slow,
not failed); so after a write that needed a retry, the writer lists the task's rows of this model version again and
deletes every copy but the first, leaving exactly one; a background job does that once more for such tasks before it
finishes, for a commit later still.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import httpx
import orjson

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest
from serve_app.label_studio.credentials import LabelStudioAuthError, LabelStudioCredentials
from serve_app.label_studio.retries import TRANSIENT_STATUS, TransientError, retry_after, with_retries


logger = get_logger(__name__)

MAX_PAGES = 20  # pages of one task's predictions read to check for a stored row


class PredictionRefused(RuntimeError):
    """Label Studio answered, and said no (a 4xx other than a timeout or rate limit): retrying will not help."""


# (URL to request, extra headers, httpx extensions) for a URL: how the ingress reaches a host it checked
# (ImageFetcher.connect_target). The CLI, told the Label Studio URL by its user, goes by name.
Route = Callable[[str], Awaitable[tuple[str, dict[str, str], dict[str, str]]]]


async def by_name(url: str) -> tuple[str, dict[str, str], dict[str, str]]:
    return url, {}, {}


class PredictionWriter:
    def __init__(self, credentials: LabelStudioCredentials, *, route: Route = by_name, retries: int = 5,
                 timeout_s: float = 30.0, max_delay_s: float = 30.0, bulk: bool = True):
        self.credentials = credentials
        self.route = route
        self.retries = retries
        self.timeout_s = timeout_s
        self.max_delay_s = max_delay_s
        self.bulk = bulk  # bulk imports; off for good once Label Studio refuses the endpoint

    @property
    def base_url(self) -> str:
        return self.credentials.base_url

    def describe(self) -> str:
        return f"{self.base_url} with the {self.credentials.describe()}"

    async def create_many(self, project_id: int | None, items: list[tuple[int, dict[str, Any]]],
                          model_version: str) -> tuple[dict[int, str | None], set[int]]:
        """Store the predictions of several tasks of one project: ({task id: None when stored, else why not}, the
        task ids whose write's fate was unknown on the way). One `POST /api/projects/{id}/import/predictions` when
        Label Studio takes it (all or nothing for up to 500 rows); otherwise, or when that call's fate is unknown,
        one `create` per task, each asking first whether its row is there already."""
        results: dict[int, str | None] = {}
        uncertain: set[int] = set()
        check_first = False
        if self.bulk and project_id is not None and len(items) > 1:
            outcome = await self._import(project_id, items, model_version)
            if outcome == "stored":
                return {task_id: None for task_id, _ in items}, uncertain
            check_first = outcome == "unknown"
        for task_id, prediction in items:
            try:
                if await self.create(task_id, prediction, model_version, check_first=check_first):
                    uncertain.add(task_id)
                results[task_id] = None
            except (PredictionRefused, TransientError) as exc:
                results[task_id] = f"storing the prediction failed: {exc}"
        return results, uncertain

    async def _import(self, project_id: int, items: list[tuple[int, dict[str, Any]]], model_version: str) -> str:
        """One bulk import: "stored", "refused" (nothing was stored: one task per call will say which and why) or
        "unknown" (the rows may be there)."""
        body = orjson.dumps([{"task": task_id, "result": prediction["result"], "score": prediction.get("score", 0.0),
                              "model_version": model_version} for task_id, prediction in items],
                            option=orjson.OPT_SERIALIZE_NUMPY)
        try:
            response = await self._request("POST", f"/api/projects/{project_id}/import/predictions", content=body,
                                           headers={"Content-Type": "application/json"})
        except (TransientError, PredictionRefused) as exc:
            logger.warning("bulk import of %d predictions: %s; storing them one by one", len(items), exc)
            return "unknown"
        if response.status_code in (403, 404, 405):  # an older Label Studio, or a key that may not import
            self.bulk = False
            logger.warning("Label Studio answered HTTP %d to a bulk import of predictions (%s): storing one "
                           "prediction per call from now on", response.status_code, self.credentials.describe())
            return "refused"
        if response.status_code in (400, 401, 422):  # validation (a deleted task), an expired access token
            return "refused"
        if response.status_code >= 300:
            return "unknown"
        try:
            created = response.json().get("created")
        except (ValueError, AttributeError):
            created = None
        return "stored" if created == len(items) else "unknown"

    async def create(self, task_id: int, prediction: dict[str, Any], model_version: str,
                     check_first: bool = False) -> bool:
        """Store one prediction of `task_id`; whether an attempt's fate was unknown on the way (then a late commit of
        it may still add a copy: `keep_one` later removes it). `check_first`: an earlier call may have stored it.
        Raises PredictionRefused, or TransientError once retries are spent."""
        body = orjson.dumps({"task": task_id, "result": prediction["result"], "score": prediction.get("score", 0.0),
                             "model_version": model_version}, option=orjson.OPT_SERIALIZE_NUMPY)
        refreshed = False
        tried = check_first
        uncertain = check_first  # an attempt may have stored a row without the writer learning of it

        async def attempt() -> None:
            nonlocal refreshed, tried, uncertain
            if tried:
                uncertain = True
                if await self.stored(task_id, model_version):
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
            if not _is_row(response):  # a 2xx that is not Label Studio's (an SSO proxy's login page)
                raise PredictionRefused(f"storing the prediction of task {task_id} was answered HTTP "
                                        f"{response.status_code} {response.headers.get('content-type', '')!r} "
                                        "without the stored row: is a proxy in front of Label Studio?")

        await with_retries(attempt, self.retries, f"storing the prediction of task {task_id}", self.max_delay_s)
        if uncertain:
            await with_retries(lambda: self.keep_one(task_id, model_version), self.retries,
                               f"checking task {task_id} for a second copy", self.max_delay_s)
        return uncertain

    async def stored(self, task_id: int, model_version: str) -> bool:
        """Whether the task already holds a prediction of `model_version`."""
        return bool(await self.rows(task_id, model_version))

    async def keep_one(self, task_id: int, model_version: str) -> int:
        """Delete all but the first of the task's predictions of `model_version`; how many were deleted."""
        rows = sorted(await self.rows(task_id, model_version), key=lambda row: row["id"])
        for extra in rows[1:]:
            response = await self._request("DELETE", f"/api/predictions/{extra['id']}/")
            if response.status_code in TRANSIENT_STATUS:
                raise TransientError(f"Label Studio answered HTTP {response.status_code} deleting a second copy",
                                     retry_after(response.headers.get("retry-after")))
            if response.status_code not in (200, 204, 404):
                raise PredictionRefused(f"Label Studio answered HTTP {response.status_code} deleting prediction "
                                        f"{extra['id']}, a second copy of task {task_id}'s")
        if len(rows) > 1:
            logger.warning("task %s held %d predictions of %s after a retried write: kept prediction %s",
                           task_id, len(rows), model_version, rows[0]["id"])
        return max(0, len(rows) - 1)

    async def rows(self, task_id: int, model_version: str) -> list[dict[str, Any]]:
        """The task's predictions of `model_version`, every page of them. A row counts only if it says it belongs to
        this task: a Label Studio (or a proxy) that ignores `?task=` must not turn a failed write into "stored"."""
        found: list[dict[str, Any]] = []
        path, params = "/api/predictions/", {"task": task_id}
        for _ in range(MAX_PAGES):
            response = await self._request("GET", path, params=params)
            if response.status_code in TRANSIENT_STATUS:
                raise TransientError(f"Label Studio answered HTTP {response.status_code}",
                                     retry_after(response.headers.get("retry-after")))
            if response.status_code != 200:
                raise PredictionRefused(f"Label Studio answered HTTP {response.status_code} listing the predictions "
                                        f"of task {task_id} ({self.credentials.describe()})")
            try:
                page = response.json()
            except ValueError:
                raise PredictionRefused(
                    f"Label Studio's list of task {task_id}'s predictions is not JSON "
                    f"({response.headers.get('content-type', 'no content type')}: a login page of a proxy?)") from None
            rows = page.get("results") if isinstance(page, dict) else page  # paginated or not
            if not isinstance(rows, list):
                raise PredictionRefused(f"Label Studio's list of task {task_id}'s predictions has no rows")
            found += [row for row in rows if isinstance(row, dict) and row.get("task") == task_id
                      and row.get("model_version") == model_version and isinstance(row.get("id"), int)]
            following = page.get("next") if isinstance(page, dict) else None
            if not isinstance(following, str) or not following.startswith(self.base_url):
                return found
            path, params = following[len(self.base_url):], None
        raise PredictionRefused(f"task {task_id} has more than {MAX_PAGES} pages of predictions")

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


def _is_row(response: httpx.Response) -> bool:
    try:
        row = response.json()
    except ValueError:
        return False
    return isinstance(row, dict) and "id" in row
