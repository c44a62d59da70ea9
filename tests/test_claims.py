"""Task claims without Ray: the in-process book, and the JobClaims deployment's class (its claims, releases and the
leases that drop a dead ingress replica's claims)."""

from __future__ import annotations

import asyncio

from serve_app.deployments.job_claims import JobClaims
from serve_app.ingress.claims import LocalClaims

A, B = ("http://a:8080", "1", 5), ("http://a:8080", "1", 6)


def test_a_task_is_held_by_one_job_until_that_job_releases_it():
    claims = LocalClaims()

    async def scenario():
        assert await claims.claim("job1", [A, B]) == {}
        assert await claims.claim("job2", [A]) == {A: "job1"}
        claims.release("job2", [A])  # not its claim: nothing happens
        assert claims.get(A) == "job1"
        claims.release("job1", [A])
        return await claims.claim("job2", [A, B])

    assert asyncio.run(scenario()) == {B: "job1"}


def test_the_deployment_drops_the_claims_of_a_replica_whose_lease_ran_out(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("serve_app.deployments.job_claims.time.monotonic", lambda: now[0])
    book = JobClaims.func_or_class(lease_s=60)

    async def scenario():
        assert await book.claim("replica-1", "job1", [A, B]) == []
        assert await book.claim("replica-2", "job2", [A]) == [(A, "job1")]
        now[0] += 30
        await book.renew("replica-2")
        assert await book.claim("replica-2", "job2", [A]) == [(A, "job1")]  # replica-1 is still alive
        now[0] += 40  # replica-1 renewed nothing for 70 s: gone
        refused = await book.claim("replica-2", "job2", [A])
        await book.release("replica-2", [("job2", [A])])
        return refused, len(book.holders)

    assert asyncio.run(scenario()) == ([], 0)
