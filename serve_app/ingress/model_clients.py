"""One client per model role: its deployment's handle and name, and one retry when a replica is lost.

The graph plan (serve_app.graph_plan) says which deployment answers each role; in the concept pipeline the
Detector (SAM 3) answers clicks too, so a lost click is retried there and judged by that deployment's replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Callable

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest, ServiceUnavailable
from serve_app.models.messages import PromptUnsupported

logger = get_logger(__name__)

STATUS_RECHECK_S = 1.0  # how often a retry after a replica loss asks whether a replica is still running
_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def running_replicas(status, app_name: str, deployment: str) -> int:
    """RUNNING replicas of `deployment` in a `serve.status()` answer."""
    application = status.applications.get(app_name)
    overview = application.deployments.get(deployment) if application else None
    return int(overview.replica_states.get("RUNNING", 0)) if overview else 0


async def _awaited(response):
    """A DeploymentResponse's result as a coroutine, so it can be shielded and waited on as a task."""
    return await response


class ServeStatus:
    """`serve.status()`, read at most every STATUS_RECHECK_S and shared by every waiting retry: it costs ~40 ms of
    this replica's CPU (GIL held)."""

    def __init__(self):
        self._lock = asyncio.Lock()
        self._status, self._read_at = None, float("-inf")

    async def running_replicas(self, deployment: str) -> int:
        """0 when the controller cannot answer."""
        async with self._lock:
            if time.monotonic() - self._read_at >= STATUS_RECHECK_S:
                try:
                    self._status = await asyncio.to_thread(serve.status)
                except Exception:  # noqa: BLE001 - a controller that cannot answer counts as no replica
                    logger.warning("cannot read Serve status while retrying a %s call", deployment, exc_info=True)
                    self._status = None
                self._read_at = time.monotonic()
        if self._status is None:
            return 0
        return running_replicas(self._status, serve.get_replica_context().app_name, deployment)


class ModelClient:
    def __init__(self, deployment: str, handle: DeploymentHandle, method: str, *, status: ServeStatus,
                 retry_timeout_s: float, on_replica_failure: Callable[[str], Any] = lambda deployment: None):
        self.deployment = deployment
        self._method = getattr(handle, method)
        self._status = status
        self._retry_timeout_s = retry_timeout_s
        self._on_replica_failure = on_replica_failure

    async def __call__(self, request):
        """One model call. A replica that dies mid-request is retried once, on another replica or the one Serve
        starts in its place. If no replica of the deployment is running REPLICA_RETRY_TIMEOUT_S later, the request
        gets a 503; while one is, the retry is work queued or running there, and only the task's own timeout
        (TASK_TIMEOUT_S) bounds it: a busy CPU replica can take minutes, and cutting it would waste that work."""
        try:
            with self._answers():
                return await self._method.remote(request)
        except _LOST as exc:
            self._on_replica_failure(self.deployment)
            logger.warning("%s replica failed (%s); retrying once", self.deployment, exc.__class__.__name__)
        try:
            with self._answers():
                return await self._retry(request)
        except _LOST as exc:
            raise ServiceUnavailable(f"the {self.deployment} deployment failed twice: {exc.__class__.__name__}") \
                from None

    @contextlib.contextmanager
    def _answers(self):
        """A model's refusal as the caller's 400, and an overloaded deployment as a 503."""
        try:
            yield
        except PromptUnsupported as exc:  # Ray re-raises the replica's exception as a subclass of it
            raise BadRequest(str(getattr(exc, "cause", exc))) from None
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {self.deployment} deployment is overloaded ({exc})") from None

    async def _retry(self, request):
        name = self.deployment
        response = self._method.remote(request)
        retry = asyncio.ensure_future(_awaited(response))
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(retry), timeout=self._retry_timeout_s)
            except asyncio.TimeoutError:
                logger.info("%s retry not answered after %g s: waiting while Serve reports a running replica", name,
                            self._retry_timeout_s)
            # Serve's status learns of a dead replica at its next health check, seconds later: ask again each second
            while not (await asyncio.wait({retry}, timeout=STATUS_RECHECK_S))[0]:
                if not await self._status.running_replicas(name):
                    raise ServiceUnavailable(
                        f"the {name} deployment lost a replica and none was running "
                        f"{self._retry_timeout_s:g} s later (REPLICA_RETRY_TIMEOUT_S)") from None
            return retry.result()
        finally:
            if not retry.done():  # a 503, or this task was cancelled: the replica must not go on with it
                retry.cancel()
                response.cancel()
