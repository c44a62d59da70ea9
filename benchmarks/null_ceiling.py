"""The service's own ceiling: the whole graph with models that cost nothing (serve_app.models.null_models).

    python -m benchmarks.null_ceiling [--tasks 400] [--tasks-per-request 10] [--concurrency 4] [--boxes 20]

Label Studio's "Retrieve predictions" bodies of 640x480 PNG tasks served over loopback, each answered with
`--boxes` boxes and as many compact masks (RLE made in the Segmenter replica): every cost but the models' own
(fetch, decode, Serve's hops, batching, encoding, JSON). Reports tasks/s and where the CPU went: seconds of CPU per
task for each process of the service (ingress, proxy, each model replica, Ray's own) and the ingress's stage
times. Issue #31's goal for this 2-core machine: at least 30 tasks/s. Writes benchmarks/results/null-ceiling-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.harness import ImageServer, distinct_images, machine, replica_name, retrieve_body, run_load, \
    session_processes, start_service
from serve_app.tiny_models.null import make_null_models

ROOT = Path(__file__).resolve().parents[1]


def cpu_by_process(service) -> dict[str, float]:
    """CPU seconds so far of each process of the service, by role."""
    seconds: dict[str, float] = {}
    for proc in session_processes(service, ("cmdline", "cpu_times")):
        try:
            title = " ".join(proc.info["cmdline"] or ["?"]).split(" ")[0]
            times = proc.info["cpu_times"]
            used = times.user + times.system
        except (AttributeError, TypeError, psutil.Error):
            continue
        name = replica_name(proc.info["cmdline"] or ["?"], other="")
        if not name:
            name = {"ray::ProxyActor": "proxy", "ray::ServeController": "controller"}.get(
                title.split(".")[0], "ray and serve run (raylet, gcs, dashboard, driver, workers)")
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--tasks-per-request", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--ingress-replicas", type=int, default=1,
                        help="Ingress num_replicas: on a node with more cores, the ceiling grows with them "
                             "(docs/gpu-placement.md)")
    parser.add_argument("--out", type=Path, help="the JSON's path (default benchmarks/results/null-ceiling-cpu.json)")
    args = parser.parse_args()

    models = make_null_models(Path(tempfile.mkdtemp(prefix="gs-null-")), boxes=args.boxes)
    images = ImageServer(distinct_images(args.tasks))
    names = sorted(images.files)
    bodies = [retrieve_body([f"{images.url}/{name}" for name in names[i:i + args.tasks_per_request]])
              for i in range(0, len(names), args.tasks_per_request)]
    for n, task in enumerate(task for body in bodies for task in body["tasks"]):
        task["id"] = 1000 + n  # each task once: the jobs answer a task already in hand only once
    warm_up = [retrieve_body([f"{images.url}/{name}"]) for name in names[:2]]
    for n, body in enumerate(warm_up):
        body["tasks"][0]["id"] = 100 + n
    def ingress_replicas(config: dict) -> None:
        ingress = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Ingress")
        ingress["num_replicas"] = args.ingress_replicas

    service = start_service({"DETECTOR_MODEL": str(models["null_detector"]),
                             "SEGMENTER_MODEL": str(models["null_segmenter"]), "MAX_DETECTIONS": str(args.boxes)},
                            ingress_replicas)
    try:
        warm = run_load(service.url, warm_up, requests=2, concurrency=2)  # the first requests pay for imports
        before, started = cpu_by_process(service), time.perf_counter()
        load = run_load(service.url, bodies, requests=len(bodies), concurrency=args.concurrency)
        wall = time.perf_counter() - started
        after = cpu_by_process(service)
        metrics = service.settled_metrics()
    finally:
        service.stop()
        images.close()
    tasks = len(bodies) * args.tasks_per_request
    cpu = {name: round((after.get(name, 0.0) - before.get(name, 0.0)) * 1000 / tasks, 2) for name in after}
    report = {
        "machine": machine(),
        "command": f"python -m benchmarks.null_ceiling --tasks {args.tasks} --tasks-per-request "
                   f"{args.tasks_per_request} --concurrency {args.concurrency} --boxes {args.boxes} "
                   f"--ingress-replicas {args.ingress_replicas}",
        "ingress_replicas": args.ingress_replicas,
        "tasks": tasks, "boxes_and_masks_per_task": args.boxes, "image": "640x480 PNG over loopback",
        "tasks_per_s": round(tasks / wall, 2), "load": load, "warm_up": warm,
        "cpu_ms_per_task_by_process": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
        "cpu_ms_per_task_total": round(sum(cpu.values()), 2),
        "ingress_stage_mean_s": {name.split(":", 1)[1]: round(value["mean_s"], 4)
                                 for name, value in metrics.get("seconds", {}).items() if name.startswith("stage")},
        "batch_sizes": metrics.get("batch_sizes"),
        "tasks_answered": metrics.get("counters", {}).get("predict_tasks"),
    }
    out = args.out or ROOT / "benchmarks" / "results" / "null-ceiling-cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
