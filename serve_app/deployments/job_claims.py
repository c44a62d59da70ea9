"""The JobClaims deployment: one place where every ingress replica claims the tasks its background jobs run
(serve_app.ingress.claims), so that two replicas never run or store the same task of the same project twice.

One replica, no CPU reserved: a dict of claims and a lease per ingress replica. Its methods never await, so each
call is atomic on the replica's event loop. If it restarts, the claims of running jobs are gone: until their
jobs finish, a second Retrieve of the same tasks could run them again (each still stored once per write path's
checks). Bounded by what the ingress replicas hold: their queued and running tasks (MAX_BACKGROUND_TASKS each) and
the stored tasks of their last 20 jobs.
"""

from __future__ import annotations

import time

from ray import serve

from serve_app.ingress.claims import Key, claim_in, release_in

LEASE_S = 120.0  # an ingress replica renews every LEASE_S / 4; its claims go when it has not for LEASE_S


@serve.deployment(name="JobClaims", num_replicas=1, max_ongoing_requests=1024,
                  ray_actor_options={"num_cpus": 0}, health_check_period_s=10)
class JobClaims:
    def __init__(self, lease_s: float = LEASE_S):
        self.lease_s = lease_s
        self.holders: dict[Key, tuple[str, str]] = {}  # key -> (ingress replica, job id)
        self.leases: dict[str, float] = {}  # ingress replica -> when its lease ends

    async def claim(self, owner: str, job_id: str, keys: list[Key]) -> list[tuple[Key, str]]:
        self._renew(owner)
        refused = claim_in(self.holders, job_id, keys, lambda holder: holder[1], value=(owner, job_id))
        return list(refused.items())

    async def release(self, owner: str, batch: list[tuple[str, list[Key]]]) -> None:
        self._renew(owner)
        for job_id, keys in batch:
            release_in(self.holders, job_id, keys, lambda holder: holder[1])

    async def renew(self, owner: str) -> int:
        self._renew(owner)
        return len(self.holders)

    def _renew(self, owner: str) -> None:
        now = time.monotonic()
        self.leases[owner] = now + self.lease_s
        lapsed = {replica for replica, ends in self.leases.items() if ends < now}
        if lapsed:
            for replica in lapsed:
                del self.leases[replica]
            self.holders = {key: holder for key, holder in self.holders.items() if holder[0] not in lapsed}
