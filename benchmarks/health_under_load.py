"""`GET /health` while the service is loaded (issue 14 item 14): Label Studio gives /health 1 s.

    python -m benchmarks.health_under_load [--clients 48] [--requests 1000] [--models tiny]

Starts the service, drives `--requests` single-task text-prompted /predict requests (a different 640x480
image each, boxes and masks back) from a separate process with `--clients` in flight, and meanwhile times
GET /health every 0.2 s from this process. Reports /health p50/p95/max and the load's own summary.
Loopback only; bounded by the request count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness import (ROOT, ImageServer, distinct_images, machine, python_path, start_service,
                                text_prompt_body)
from benchmarks.models import MODEL_SETS, model_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--models", choices=MODEL_SETS, default="tiny")
    parser.add_argument("--load-niceness", type=int, default=10,
                        help="nice value of the load generator: Label Studio's clients run on other machines, and on a "
                             "small box an un-niced generator takes a core from the service it measures")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    files = distinct_images(64)
    images = ImageServer(files)
    bodies = [text_prompt_body(f"{images.url}/{name}") for name in sorted(files)]
    service = start_service(model_env(args.models))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(bodies, handle)
    health: list[float] = []
    try:
        load = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load", "--url", f"{service.url}/predict", "--body", handle.name,
             "--requests", str(args.requests), "--concurrency", str(args.clients), "--timeout-s", "300"],
            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": python_path()},
            preexec_fn=lambda: os.nice(args.load_niceness))
        with httpx.Client(base_url=service.url, timeout=10) as client:
            while load.poll() is None:
                started = time.perf_counter()
                client.get("/health").raise_for_status()
                health.append(time.perf_counter() - started)
                time.sleep(0.2)
        summary = json.loads(load.stdout.read().strip().splitlines()[-1])
    finally:
        service.stop()
        images.close()
        os.unlink(handle.name)

    ordered = sorted(health)
    result = {
        "scenario": "health under load", "models": args.models, "clients": args.clients,
        "load_niceness": args.load_niceness, **machine(),
        "health_samples": len(health),
        "health_p50_ms": round(statistics.median(health) * 1000, 1),
        "health_p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
        "health_max_ms": round(ordered[-1] * 1000, 1),
        "health_over_1s": sum(1 for h in health if h >= 1.0),
        "load": summary,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
