"""Bounded load over loopback, run as its own process so the client does not share the service's GIL.

    python -m benchmarks.load --url http://127.0.0.1:9090/predict --body body.json --requests 64 --concurrency 8

Sends exactly `--requests` POSTs with at most `--concurrency` in flight (loopback URLs only) and prints
one JSON object: wall time, throughput, latency percentiles, and how many answers were not 200 or
reported `task_errors`. When the
body file holds a JSON list, request i sends body i modulo its length (e.g. a different image each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np


def summarize(latencies_s: list[float], wall_s: float, requests: int, tasks_per_request: int,
              failures: int) -> dict:
    array = np.asarray(latencies_s) * 1000
    return {
        "requests": requests,
        "failures": failures,
        "wall_s": round(wall_s, 3),
        "requests_per_s": round(requests / wall_s, 3),
        "tasks_per_s": round(requests * tasks_per_request / wall_s, 3),
        "p50_ms": round(float(np.percentile(array, 50)), 1),
        "p95_ms": round(float(np.percentile(array, 95)), 1),
        "p99_ms": round(float(np.percentile(array, 99)), 1),
        "min_ms": round(float(array.min()), 1),
        "max_ms": round(float(array.max()), 1),
    }


async def drive(url: str, bodies: list[bytes], requests: int, concurrency: int,
                timeout_s: float) -> tuple[list, float, int]:
    latencies: list[float] = []
    failures = 0
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits, trust_env=False) as client:
        async def worker() -> None:
            nonlocal failures
            for i in remaining:
                body = bodies[i % len(bodies)]
                started = time.perf_counter()
                response = await client.post(url, content=body, headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - started)
                # a task that failed or timed out still gets a 200 with `task_errors`, and tasks unfinished at
                # PREDICT_DEADLINE_S come back empty with a background `job`: count both
                if response.status_code != 200 or b'"task_errors"' in response.content or b'"job"' in response.content:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="JSON file with the /predict body")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load is only sent to loopback addresses")
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..10000 and --concurrency 1..256")
    payload = json.loads(Path(args.body).read_bytes())
    payloads = payload if isinstance(payload, list) else [payload]
    bodies = [json.dumps(p).encode() for p in payloads]
    tasks = len(payloads[0]["tasks"])
    latencies, wall, failures = asyncio.run(drive(args.url, bodies, args.requests, args.concurrency, args.timeout_s))
    print(json.dumps({"concurrency": args.concurrency, **summarize(latencies, wall, args.requests, tasks, failures)}))


if __name__ == "__main__":
    main()
