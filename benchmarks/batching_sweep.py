"""Scenario 4, batching on versus off, and a concurrency sweep.

    python -m benchmarks.batching_sweep [--models tiny] [--levels 1,2,4,8,16,32] [--batch-sizes 8,1]

For each `max_batch_size` (8 = configs/serve.yaml, 1 = batching off) the service is started from the
same config, and for each concurrency level a separate process sends single-task text-prompted
requests, each on a different 640x480 image (embedding cache off), max(16, 3 x level) of them.
Reported per row: requests/s, p50/p95/p99 latency, and the mean batch size per model deployment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.harness import (BatchCounter, ImageServer, distinct_images, machine, replica_rss_mb, run_load,
                                start_service, text_prompt_body, user_config)
from benchmarks.models import MODEL_SETS, model_env
from tests.serve_process import ServeProcess


def mean_batch(histogram: dict[str, int]) -> float:
    items = sum(histogram.values())
    return round(sum(int(size) * n for size, n in histogram.items()) / items, 2) if items else 0.0


def sweep(service: ServeProcess, bodies: list[dict], levels: list[int], max_batch_size: int | str,
          requests_per_level=lambda level: max(16, 3 * level), counter: BatchCounter | None = None) -> list[dict]:
    """One row per concurrency level on a running service: its load report and the mean batch per model."""
    counter = counter or BatchCounter(service)
    rows = []
    for level in levels:
        requests = requests_per_level(level)
        report = run_load(service.url, bodies, requests=requests, concurrency=level)
        histograms = counter.since_last({"Detector": requests, "Segmenter": requests})  # one task per request
        rows.append({"max_batch_size": max_batch_size, **report,
                     "mean_batch": {name: mean_batch(h) for name, h in histograms.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", choices=MODEL_SETS, default="tiny")
    parser.add_argument("--levels", default="1,2,4,8,16,32")
    parser.add_argument("--batch-sizes", default="8,1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    env = {**model_env(args.models), "SAM_EMBEDDING_CACHE_BYTES": "0", "DEVICE": args.device,
           "PRECISION": args.precision}
    images = ImageServer(distinct_images(64))
    bodies = [text_prompt_body(f"{images.url}/{name}") for name in sorted(images.files)]
    rows, rss = [], {}
    try:
        for max_batch_size in [int(x) for x in args.batch_sizes.split(",")]:
            service = start_service(env, user_config(max_batch_size=max_batch_size))
            try:
                run_load(service.url, bodies[:4], requests=4, concurrency=2)  # warm-up
                rows += sweep(service, bodies, levels, max_batch_size)
                rss[f"max_batch_size={max_batch_size}"] = replica_rss_mb(service)
            finally:
                service.stop()
    finally:
        images.close()

    result = {"scenario": "batching sweep", "models": args.models, "device": args.device,
              "precision": args.precision, **machine(), "rows": rows, "rss_mb": rss}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
