"""Scenario 3, seed-architecture baseline: one "Retrieve predictions" request of N tasks, timed on the
single-process backend (benchmarks.seed_backend) and on the service, with the same models and images.

    python -m benchmarks.seed_compare [--models tiny] [--tasks 64] [--repeats 2] [--boxes 20]
    python -m benchmarks.seed_compare --models full-vit_t --device cuda --precision fp16     # on a GPU machine

Each task is a different 640x480 PNG fetched from a loopback image server; labels from the project's
config are the prompt; boxes and brush masks come back. The SAM embedding cache is off on both sides
(SAM_EMBEDDING_CACHE_BYTES=0), so repeats do not hit it. One side runs at a time; each gets a warm-up
request first. Throughput = tasks / wall time of the whole request, median over the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import psutil

from benchmarks.harness import (BatchCounter, ImageServer, distinct_images, machine,
                                long_requests, replica_rss_mb, retrieve_body, run_load, seed_backend, start_service)
from benchmarks.models import MODEL_SETS, model_env
from tests.serve_process import model_deployments


def time_requests(url: str, body: dict, warmup: dict, repeats: int) -> list[dict]:
    run_load(url, warmup, requests=1, concurrency=1)
    return [run_load(url, body, requests=1, concurrency=1) for _ in range(repeats)]


def run_seed(env: dict[str, str], body: dict, warmup: dict, repeats: int) -> tuple[list[dict], int]:
    with seed_backend(env) as (pid, url):
        reports = time_requests(url, body, warmup, repeats)
        return reports, round(psutil.Process(pid).memory_info().rss / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", choices=MODEL_SETS, default="tiny")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-latency-ms", type=float, default=0.0,
                        help="delay each image download, like remote cloud storage")
    parser.add_argument("--boxes", type=int, default=0,
                        help="equal work: BOX_THRESHOLD=TEXT_THRESHOLD=0 and MAX_DETECTIONS=N on both sides")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--seed-from", type=Path, default=None,
                        help="reuse the seed side of an earlier run's JSON (same models and options) instead of "
                             "timing it again")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="replicas' user_config.torch_threads (experiments; 0 = configs/serve.yaml as shipped)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service (experiments)")
    parser.add_argument("--seed-env", action="append", default=[],
                        help="NAME=VALUE for the seed's process (experiments: e.g. the replicas' GLIBC_TUNABLES)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    env = {**model_env(args.models), "SAM_EMBEDDING_CACHE_BYTES": "0", "DEVICE": args.device,
           "PRECISION": args.precision, "TASK_TIMEOUT_S": "3000", "PREDICT_DEADLINE_S": "3000"}  # all in the answer
    if args.boxes:
        env.update({"BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": str(args.boxes)})
    images = ImageServer(distinct_images(args.tasks + 4), latency_s=args.image_latency_ms / 1000)
    names = sorted(images.files)
    body = retrieve_body([f"{images.url}/{name}" for name in names[:args.tasks]])
    warmup = retrieve_body([f"{images.url}/{name}" for name in names[args.tasks:]])
    try:
        if args.seed_from:
            earlier = json.loads(args.seed_from.read_text())
            seed_reports = [{"wall_s": w, "tasks_per_s": args.tasks / w, "failures": 0} for w in earlier["seed_wall_s"]]
            seed_rss = earlier["rss_mb"]["seed process"]
        else:
            seed_reports, seed_rss = run_seed({**env, **dict(item.split("=", 1) for item in args.seed_env)}, body,
                                              warmup, args.repeats)
        def config(serve_config: dict) -> None:
            long_requests(serve_config)
            for deployment in model_deployments(serve_config) if args.torch_threads else ():
                deployment["user_config"]["torch_threads"] = args.torch_threads

        service = start_service({**env, **dict(item.split("=", 1) for item in args.env)}, config)
        try:
            counter = BatchCounter(service)
            graph_reports = time_requests(service.url, body, warmup, args.repeats)
            histograms = counter.since_last()
            rss = replica_rss_mb(service)
        finally:
            service.stop()
    finally:
        images.close()

    assert all(r["failures"] == 0 for r in seed_reports + graph_reports), (seed_reports, graph_reports)
    seed_tps = statistics.median(r["tasks_per_s"] for r in seed_reports)
    graph_tps = statistics.median(r["tasks_per_s"] for r in graph_reports)
    result = {
        "scenario": "seed baseline", "models": args.models, "tasks": args.tasks, "boxes": args.boxes or None,
        "device": args.device, "precision": args.precision,
        "image_latency_ms": args.image_latency_ms, "seed_from": str(args.seed_from) if args.seed_from else None,
        "service_env": args.env, "seed_env": args.seed_env, "service_torch_threads": args.torch_threads or "as shipped",
        **machine(),
        "seed_wall_s": [r["wall_s"] for r in seed_reports],
        "graph_wall_s": [r["wall_s"] for r in graph_reports],
        "seed_tasks_per_s": round(seed_tps, 3),
        "graph_tasks_per_s": round(graph_tps, 3),
        "speedup": round(graph_tps / seed_tps, 2),
        "graph_batch_sizes": histograms,
        "rss_mb": {"seed process": seed_rss, **rss},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
