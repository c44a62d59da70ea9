"""Task claims: which job holds each task (per Label Studio instance and project), so no task runs or is stored twice.

A job claims its tasks when its /predict arrives and releases a task when it fails, goes back in an answer, or when
the job leaves the board's history. `LocalClaims` keeps them in one process (in-process callers, tests). In the
service the ingress may run several replicas, each with its own job board, so the claims live in one place all of
them call, the JobClaims deployment (serve_app.deployments.job_claims), through `SharedClaims`: a Retrieve that
reaches replica A while replica B still runs the same tasks gets `[]` for them, as it would on B.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Iterable

from serve_app import get_logger

logger = get_logger(__name__)

Key = tuple[str, str, int]  # (instance origin, project id, task id)


class LocalClaims:
    def __init__(self) -> None:
        self.holders: dict[Key, str] = {}  # key -> job id

    async def claim(self, job_id: str, keys: list[Key]) -> dict[Key, str]:
        """Claim `keys` for `job_id`; those another job holds are refused: {key: that job's id}."""
        return claim_in(self.holders, job_id, keys, lambda holder: holder)

    def release(self, job_id: str, keys: Iterable[Key]) -> None:
        release_in(self.holders, job_id, keys, lambda holder: holder)

    def __len__(self) -> int:
        return len(self.holders)

    def __iter__(self):
        return iter(self.holders)

    def get(self, key: Key) -> str | None:
        return self.holders.get(key)


def claim_in(holders: dict, job_id: str, keys: list[Key], job_of, value: Any = None) -> dict[Key, str]:
    refused: dict[Key, str] = {}
    for key in keys:
        key = tuple(key)
        holder = holders.get(key)
        if holder is not None and job_of(holder) != job_id:
            refused[key] = job_of(holder)
        else:
            holders[key] = job_id if value is None else value
    return refused


def release_in(holders: dict, job_id: str, keys: Iterable[Key], job_of) -> None:
    for key in keys:
        key = tuple(key)
        holder = holders.get(key)
        if holder is not None and job_of(holder) == job_id:
            del holders[key]


class SharedClaims:
    """Claims kept by the JobClaims deployment for every ingress replica. Claiming waits for its answer (a /predict
    must know what to run); releases are sent in the background, batched. The replica renews its lease while it
    lives: the claims of a replica that died are dropped when its lease runs out."""

    def __init__(self, handle, owner: str, lease_s: float):
        self.handle = handle
        self.owner = owner
        self.lease_s = lease_s
        self._releases: list[tuple[str, list[Key]]] = []
        self._sender: asyncio.Task | None = None
        self._renewer: asyncio.Task | None = None

    async def claim(self, job_id: str, keys: list[Key]) -> dict[Key, str]:
        self._keep_lease()
        refused = await self.handle.claim.remote(self.owner, job_id, keys)
        return {tuple(key): holder for key, holder in refused}

    def release(self, job_id: str, keys: Iterable[Key]) -> None:
        keys = list(keys)
        if not keys:
            return
        self._releases.append((job_id, keys))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._send(), context=contextvars.Context())

    async def _send(self) -> None:
        while self._releases:
            batch, self._releases = self._releases, []
            try:
                await self.handle.release.remote(self.owner, batch)
            except Exception:  # noqa: BLE001 - kept until the job leaves the history, or the lease ends
                logger.warning("could not release %d task claims; they lapse with this replica's lease",
                               sum(len(keys) for _, keys in batch), exc_info=True)

    def _keep_lease(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), context=contextvars.Context())

    async def _renew(self) -> None:
        while True:
            try:
                await self.handle.renew.remote(self.owner)
            except Exception:  # noqa: BLE001 - JobClaims restarting: try again at the next beat
                logger.warning("could not renew this replica's claims lease", exc_info=True)
            await asyncio.sleep(self.lease_s / 4)
