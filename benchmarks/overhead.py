"""Scenario 1, overhead: what HTTP, the ingress and two handle hops add to one /predict (tiny models).

    python -m benchmarks.overhead [--blocks 3 --requests 10] [--batch-wait-s 0.05]

The same text-prompted request (one 640x480 PNG fetched from a loopback image server, prompt
"cats. house", boxes and brush masks back) is timed through the running service, one request at a
time from a separate process, and through benchmarks.pipeline in this process with the same model
code and one torch thread (what a replica gets). Blocks alternate between the two so drift in the
machine's load hits both. Overhead = median service latency - median in-process latency. GET /health through the proxy is timed
too: the floor any request pays for one HTTP hop into Serve on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import torch

from benchmarks.harness import (BatchCounter, ImageServer, machine, replica_rss_mb, run_load,
                                start_service, text_prompt_body, user_config, without_masks)
from benchmarks.models import model_env
from benchmarks.pipeline import InProcessPipeline
from serve_app.settings import Settings
from tests.imaging import pattern, png_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10, help="per block and side")
    parser.add_argument("--batch-wait-s", type=float, default=None, help="override batch_wait_timeout_s")
    parser.add_argument("--boxes-only", action="store_true", help="no BrushLabels: one model hop, small answer")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (experiments)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args()

    env = model_env("tiny")
    images = ImageServer({"photo.png": png_bytes(pattern(480, 640, seed=1))})
    body = text_prompt_body(f"{images.url}/photo.png")
    if args.boxes_only:
        body = without_masks(body)

    torch.set_num_threads(1)
    pipeline = InProcessPipeline.load(Settings.load(env=env))
    extra_env = dict(item.split("=", 1) for item in args.env)
    service = start_service({**env, **extra_env}, user_config(batch_wait_timeout_s=args.batch_wait_s))
    try:
        run_load(service.url, body, requests=3, concurrency=1)  # warm-up: first calls compile and allocate
        for _ in range(3):
            pipeline.predict(body)
        pipeline.stage_s.clear()
        counter = BatchCounter(service)
        served, local = [], []
        for _ in range(args.blocks):
            report = run_load(service.url, body, requests=args.requests, concurrency=1)
            assert report["failures"] == 0, report
            served.append(report)
            for _ in range(args.requests):
                started = time.perf_counter()
                pipeline.predict(body)
                local.append(time.perf_counter() - started)
        histograms = counter.since_last()
        health = []  # the floor: one HTTP hop through Serve's proxy to the ingress, no model call
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for _ in range(args.blocks * args.requests):
                started = time.perf_counter()
                client.get("/health").raise_for_status()
                health.append(time.perf_counter() - started)
        rss = replica_rss_mb(service)
    finally:
        service.stop()
        pipeline.close()
        images.close()

    served_p50 = statistics.median(r["p50_ms"] for r in served)
    local_p50 = statistics.median(local) * 1000
    result = {
        "scenario": "overhead" + (" (boxes only)" if args.boxes_only else ""),
        **machine(),
        "service_p50_ms_per_block": [r["p50_ms"] for r in served],
        "service_p50_ms": round(served_p50, 1),
        "service_p95_ms": round(max(r["p95_ms"] for r in served), 1),
        "in_process_p50_ms": round(local_p50, 1),
        "in_process_spread_ms": [round(min(local) * 1000, 1), round(max(local) * 1000, 1)],
        "overhead_ms": round(served_p50 - local_p50, 1),
        "health_p50_ms": round(statistics.median(health) * 1000, 1),
        "in_process_stages_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in pipeline.stage_s.items()},
        "batch_sizes": histograms,
        "rss_mb": rss,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
