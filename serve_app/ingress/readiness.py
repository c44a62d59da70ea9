"""Whether the model deployments serve yet, for /health: polled from Serve in the background, since /health must
answer within Label Studio's 1 s even while model replicas load (or fail to)."""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve

from serve_app import get_logger
from serve_app.ingress.model_clients import running_replicas

logger = get_logger(__name__)

# serve.status() costs ~40 ms of this replica's CPU (GIL held), so poll fast only until the models serve.
READINESS_POLL_S = 1.0
READY_POLL_S = 15.0


class ModelReadiness:
    def __init__(self, deployments: dict[str, str]):
        """`deployments`: the name /health shows (detector, segmenter) -> the deployment's name in the app."""
        self._deployments = deployments
        self.ready = {key: False for key in deployments}
        self.status: dict[str, dict[str, Any]] = {}
        self._task = asyncio.get_event_loop().create_task(self._watch())

    def keep_watching(self) -> None:
        """Start the watcher again if it stopped: /health would report stale model states for ever."""
        if self._task.done():
            logger.warning("the model-readiness watcher stopped (%s); starting it again",
                           self._task.exception() if not self._task.cancelled() else "cancelled")
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        app_name = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app_name].deployments
                for key, deployment in self._deployments.items():
                    if deployment not in deployments:
                        continue
                    overview = deployments[deployment]
                    running = running_replicas(status, app_name, deployment)
                    self.ready[key] = running > 0
                    self.status[key] = {"status": str(overview.status.value), "running_replicas": running,
                                        **({"message": overview.message} if overview.message else {})}
            except Exception:  # noqa: BLE001 - the controller may be restarting; try again
                logger.debug("cannot read Serve status", exc_info=True)
            await asyncio.sleep(READY_POLL_S if all(self.ready.values()) else READINESS_POLL_S)
