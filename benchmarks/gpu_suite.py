"""The GPU run's service benchmarks in one process, each model loaded as few times as the measurements allow.

    python -m benchmarks.gpu_suite --models full-vit_t --device cuda --precisions fp32,fp16 --out DIR
    python -m benchmarks.gpu_suite --models tiny --device cpu --quick --out DIR       # the CI smoke run

For each precision, the three sides below load at once, then each is measured alone, in this order:
1. the in-process reference (the bare models, batch 1, 8 and `--images`; batch 8 again on one torch thread, as
   a GPU replica runs its CPU work; each also with the service's output work, every mask RLE-encoded), then
   each model's FLOPs per image and FLOP utilisation (benchmarks.flop_utilisation);
2. the seed architecture (benchmarks.seed_backend): a warm-up and `--repeats` "Retrieve predictions" of `--tasks`;
3. ONE service from configs/serve.yaml as shipped, which then serves, one after another: the efficiency load
   (`--images` single-image requests at once, with masks, then boxes only), the same Retrieve as the seed,
   `--busy-tasks` tasks in Retrieves of 10, 8 at once (the first -compact run, else the first), and the batching
   sweep's concurrency levels (not in -compact runs); then `serve deploy` sets max_batch_size 1 (batching off) on the
   same replicas, in place, for the sweep's levels above 1.
Every step does the same work: BOX_THRESHOLD=TEXT_THRESHOLD=0 and MAX_DETECTIONS=`--boxes`, so each image has
exactly that many boxes and masks on both sides. Starting a service (a Ray cluster, replicas, model loading) costs
more than most measurements, so the steps share one per precision.

NVML samples how busy the GPU was through each load (benchmarks.gpu_busy).
A run is a precision P, or P-compact: the same with SAM's masks of a trained model's size (random weights give
noise masks, about 50 times a trained model's RLE; benchmarks.models.compact_masks).
Writes efficiency-R.json, flops-R.json, gpu-busy-R.json (one run), seed-compare-R.json and
batching-sweep-R.json per run R as soon as each is known
(the same fields as benchmarks.efficiency, benchmarks.seed_compare and benchmarks.batching_sweep), and
suite-timings.json: seconds per phase, to show where the run's time goes. A failed phase is recorded and the
others still run; the exit status says whether any failed.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from benchmarks.batching_sweep import sweep
from benchmarks.efficiency import free_gpu_memory, in_process_reference, service_load
from benchmarks.flop_utilisation import report as flop_report, with_service as flops_with_service
from benchmarks.gpu_busy import GpuBusy
from benchmarks.harness import (BatchCounter, ImageServer, allocate_like_the_replicas, distinct_images, long_requests, machine, replica_rss_mb,
                                retrieve_body, run_load, seed_backend, start_service, text_prompt_body, user_config,
                                without_masks)
from benchmarks.models import MODEL_SETS, model_env
from benchmarks.pipeline import load_models
from benchmarks.seed_compare import time_requests
from serve_app.settings import Settings


class Phases:
    """Seconds per named phase, and the phases that failed (with their error), kept going past a failure."""

    def __init__(self, out: Path):
        self.out = out
        self.seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self.started = time.monotonic()

    def run(self, name: str, work):
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            return work()
        except Exception as error:  # noqa: BLE001 - one failed phase must not cost the others
            traceback.print_exc()
            self.failed[name] = f"{type(error).__name__}: {error}"[:2000]
            return None
        finally:
            self.seconds[name] = round(time.monotonic() - started, 1)
            print(f"   {name}: {self.seconds[name]} s{' FAILED' if name in self.failed else ''}", flush=True)
            self.write()

    def write(self) -> None:
        (self.out / "suite-timings.json").write_text(json.dumps(
            {"total_s": round(time.monotonic() - self.started, 1), "phases_s": self.seconds, "failed": self.failed},
            indent=2) + "\n")


def write(out: Path, name: str, result: dict) -> None:
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"   -> {out / name}.json", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precisions", default="fp32,fp16",
                        help="runs, one service each: a precision, or PRECISION-compact for SAM with masks of a "
                             "trained model's size (benchmarks.models.compact_masks)")
    parser.add_argument("--images", type=int, default=48, help="efficiency: single-image requests sent at once")
    parser.add_argument("--tasks", type=int, default=32, help="seed comparison: tasks in the Retrieve")
    parser.add_argument("--repeats", type=int, default=2, help="seed comparison: timed Retrieves per side")
    parser.add_argument("--boxes", type=int, default=20, help="boxes (and masks) per image, on every side")
    parser.add_argument("--levels", default="1,8,32", help="batching sweep: concurrency levels")
    parser.add_argument("--busy-tasks", type=int, default=500,
                        help="GPU busy: tasks of the Retrieves sampled with NVML (10 a request, 8 at once), first "
                             "precision only; 0: none")
    parser.add_argument("--quick", action="store_true", help="smallest sizes: every phase runs, none measures")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.quick:
        args.images, args.tasks, args.repeats, args.levels, args.busy_tasks = 2, 2, 1, "1,2", 4
    levels = [int(x) for x in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    phases = Phases(args.out)

    common = {**model_env(args.models), "SAM_EMBEDDING_CACHE_BYTES": "0", "DEVICE": args.device,
              "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": str(args.boxes),
              "TASK_TIMEOUT_S": "3000", "PREDICT_DEADLINE_S": "3000"}  # every task in the answer, however slow
    compact = {**common, **model_env(args.models, masks="compact")} if "-compact" in args.precisions else common
    allocate_like_the_replicas("benchmarks.gpu_suite", common)  # the in-process reference's allocator
    files = distinct_images(max(args.images, args.tasks) + 8)
    names = sorted(files)
    pictures = [np.asarray(Image.open(io.BytesIO(files[n])).convert("RGB")) for n in names[:args.images]]
    images = ImageServer(files)
    text_bodies = [text_prompt_body(f"{images.url}/{name}") for name in names]
    boxes_bodies = [without_masks(body) for body in text_bodies]
    retrieve = retrieve_body([f"{images.url}/{name}" for name in names[:args.tasks]])
    retrieve_warmup = retrieve_body([f"{images.url}/{name}" for name in names[-4:]])
    sweep_requests = (lambda level: 2 * level) if args.quick else (lambda level: max(8, 2 * level))
    busy_bodies = [retrieve_body([f"{images.url}/{names[(start + i) % len(names)]}"
                                  for i in range(min(10, args.busy_tasks - start))])
                   for start in range(0, args.busy_tasks, 10)]
    for n, task in enumerate(task for body in busy_bodies for task in body["tasks"]):
        task["id"] = 100_000 + n  # each task once: the jobs answer a task already in hand only once

    runs = [p for p in args.precisions.split(",") if p]
    # the GPU's busy share means most with masks of a trained model's size: noise masks' RLE keeps the CPU busy
    busy_run = next((run for run in runs if run.endswith("-compact")), runs[0])
    try:
        for run in runs:
            precision, _, mask_kind = run.partition("-")  # "fp32-compact": SAM with masks of a trained model's size
            env = {**(compact if mask_kind == "compact" else common), "PRECISION": precision}
            settings = Settings.load(env=env)
            about = {"models": args.models, "device": args.device, "precision": precision,
                     "masks": mask_kind or "noise", **machine()}
            measured: dict = {}

            # The three sides load at once (seconds to a minute each); each is measured alone afterwards, while
            # the others wait idle.
            pool = ThreadPoolExecutor(2)
            service_started = pool.submit(start_service, env, long_requests)
            seed_process = seed_backend(env)
            seed_started = pool.submit(seed_process.__enter__)
            pool.shutdown(wait=False)
            try:
                models = phases.run(f"{run} load in-process models", lambda: load_models(settings))
                seed_ready = phases.run(f"{run} wait for the seed", seed_started.result)
                service = phases.run(f"{run} wait for the service", service_started.result)

                batches = sorted({1, min(8, args.images), args.images})
                reference = models and phases.run(f"{run} in-process",
                                                  lambda: in_process_reference(settings, pictures, batches, models,
                                                                               one_thread_batch=min(8, args.images)))
                flops = models and phases.run(f"{run} flops", lambda: flop_report(
                    *models, settings, pictures[:16], batch=min(8, args.images), quick=args.quick))
                models = None
                free_gpu_memory()

                def seed_phase():
                    reports = time_requests(seed_ready[1], retrieve, retrieve_warmup, args.repeats)
                    return reports, round(psutil.Process(seed_ready[0]).memory_info().rss / 1e6)

                seed = seed_ready and phases.run(f"{run} seed", seed_phase)
                if seed_started.done() and not seed_started.exception():
                    seed_process.__exit__(None, None, None)  # gone before the service is measured

                def service_phase() -> None:
                    measured["startup_s"] = round(service.startup_s, 1)
                    run_load(service.url, text_bodies[-4:], requests=4, concurrency=4)  # warm-up: batches of several
                    counter = BatchCounter(service)
                    with GpuBusy() as busy:
                        measured["masks"] = service_load(service, text_bodies[:args.images], counter)
                    measured["gpu_busy"] = {"masks": busy.result()}
                    with GpuBusy() as busy:
                        measured["boxes"] = service_load(service, boxes_bodies[:args.images], counter, ("Detector",))
                    measured["gpu_busy"]["boxes only"] = busy.result()
                    with GpuBusy() as busy:
                        measured["retrieve"] = time_requests(service.url, retrieve, retrieve_warmup, args.repeats)
                    measured["gpu_busy"]["retrieve"] = busy.result()
                    counter.since_last({name: 4 + args.repeats * args.tasks for name in ("Detector", "Segmenter")})
                    if busy_bodies and run == busy_run:
                        with GpuBusy() as busy:
                            load = run_load(service.url, busy_bodies, requests=len(busy_bodies), concurrency=8)
                        measured["busy"] = {"tasks": args.busy_tasks, "requests": len(busy_bodies), "concurrency": 8,
                                            "tasks_per_s": round(args.busy_tasks / load["wall_s"], 3),
                                            "failures": load["failures"], "gpu": busy.result()}
                        counter.since_last({name: args.busy_tasks for name in ("Detector", "Segmenter")})
                    measured["rss_mb"] = replica_rss_mb(service)
                    if mask_kind:  # a variant's efficiency and busy share only: the sweep is the plain run's
                        return
                    measured["sweep"] = sweep(service, text_bodies, levels, "as shipped", sweep_requests, counter)
                    # batching off for the sweep's levels above 1: the same replicas, reconfigured in place
                    service.update_config(user_config(max_batch_size=1))
                    if not all(service.wait_for_log(rf"{name}: max_batch_size 1\b", timeout_s=60)
                               for name in ("Detector", "Segmenter")):
                        raise RuntimeError("the replicas did not take max_batch_size 1")
                    measured["sweep"] += sweep(service, text_bodies, [level for level in levels if level > 1], 1,
                                               sweep_requests, counter)

                if service:
                    phases.run(f"{run} service", service_phase)
            finally:
                if service_started.done() and not service_started.exception():
                    service_started.result().kill()  # a throw-away cluster: a graceful shutdown costs seconds
            if reference and "masks" in measured:
                write(args.out, f"efficiency-{run}", efficiency_result(args, about, reference, measured))
            if flops:
                if "masks" in measured:
                    flops = flops_with_service(flops, args.images / measured["masks"][0]["wall_s"])
                write(args.out, f"flops-{run}", {"scenario": "flop utilisation", **about, **flops})
            if "busy" in measured:
                write(args.out, f"gpu-busy-{run}", {"scenario": "GPU busy during Retrieves", **about,
                                                         **measured["busy"], "during": measured["gpu_busy"]})
            if seed and "retrieve" in measured:
                write(args.out, f"seed-compare-{run}", seed_result(args, about, seed, measured))
            if "sweep" in measured:
                write(args.out, f"batching-sweep-{run}", {"scenario": "batching sweep", **about,
                                                                 "rows": measured["sweep"],
                                                                 "rss_mb": {"as shipped": measured.get("rss_mb")}})
    finally:
        images.close()
        phases.write()
    print(json.dumps({"total_s": round(time.monotonic() - phases.started, 1), "phases_s": phases.seconds}))
    if phases.failed:
        print(f"failed phases: {', '.join(phases.failed)}", file=sys.stderr)
    return 1 if phases.failed else 0


def efficiency_result(args, about: dict, reference: dict, measured: dict) -> dict:
    best = max(reference["images_per_s"].values())
    best_boxes = max(reference["boxes_only_images_per_s"].values())
    (masks, masks_batches), (boxes, boxes_batches) = measured["masks"], measured["boxes"]
    assert masks["failures"] == 0 and boxes["failures"] == 0, (masks, boxes)
    graph, graph_boxes = args.images / masks["wall_s"], args.images / boxes["wall_s"]
    return {
        "scenario": "serving efficiency", **about, "images": args.images, "max_detections": args.boxes,
        "replica_max_batch_size": "as shipped", "service_startup_s": measured["startup_s"],
        "in_process_images_per_s": reference["images_per_s"],
        "in_process_boxes_only_images_per_s": reference["boxes_only_images_per_s"],
        "in_process_one_torch_thread": reference["one_torch_thread"],
        "in_process_stage_s_per_image": {k: round(v / args.images, 4) for k, v in reference["stage_s"].items()},
        "graph_images_per_s": round(graph, 4), "graph_load": masks, "efficiency": round(graph / best, 3),
        # against the bare models doing the service's output work too: every mask RLE-encoded
        "in_process_equal_work_images_per_s": reference["equal_work_images_per_s"],
        "efficiency_equal_work": round(graph / max(reference["equal_work_images_per_s"].values()), 3),
        "batch_sizes": masks_batches,
        "boxes_only": {"graph_images_per_s": round(graph_boxes, 4), "graph_load": boxes,
                       "efficiency": round(graph_boxes / best_boxes, 3), "batch_sizes": boxes_batches},
        "rss_mb": measured["rss_mb"],
    }


def seed_result(args, about: dict, seed: tuple[list[dict], int], measured: dict) -> dict:
    seed_reports, seed_rss = seed
    graph_reports = measured["retrieve"]
    assert all(r["failures"] == 0 for r in seed_reports + graph_reports), (seed_reports, graph_reports)
    seed_tps = statistics.median(r["tasks_per_s"] for r in seed_reports)
    graph_tps = statistics.median(r["tasks_per_s"] for r in graph_reports)
    return {
        "scenario": "seed baseline", **about, "tasks": args.tasks, "boxes": args.boxes,
        "seed_wall_s": [r["wall_s"] for r in seed_reports], "graph_wall_s": [r["wall_s"] for r in graph_reports],
        "seed_tasks_per_s": round(seed_tps, 3), "graph_tasks_per_s": round(graph_tps, 3),
        "speedup": round(graph_tps / seed_tps, 2), "rss_mb": {"seed process": seed_rss, **measured["rss_mb"]},
    }


if __name__ == "__main__":
    sys.exit(main())
