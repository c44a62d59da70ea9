"""Scenario 2, serving efficiency: graph throughput under load / the bare models' best in-process throughput.

    python -m benchmarks.efficiency [--models full-vit_t] [--images 4] [--torch-threads 0] [--in-process-after]
    python -m benchmarks.efficiency --device cuda --precision fp16     # on a GPU machine

Full-size architectures with random weights (benchmarks.models). In-process: the same GroundingDinoDetector
and SamSegmenter called directly on decoded images, with torch's default threads (all cores), at batch size 1 and at
`--images`, and on CPU one image at a time on each of `--in-process-lanes` threads with the cores split between
them, as the Detector's CPU lanes run (the best counts). Service: `--images` single-task requests sent at once
from a separate process, each a different 640x480 image; images/s = images / wall time. MAX_DETECTIONS (default 10 here,
about what a trained Grounding DINO returns at its thresholds; random weights would fill any cap) and the
embedding cache (off) are the same on both sides.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import (BatchCounter, allocate_like_the_replicas, ImageServer, distinct_images, machine, replica_rss_mb,
                                run_load, start_service, text_prompt_body, user_config)
from benchmarks.models import MODEL_SETS, model_env
from benchmarks.pipeline import load_models
from serve_app.masks.encode import RLE, encode_masks
from serve_app.models.device import pick_device, usable_cores
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings
from tests.serve_process import ServeProcess, model_deployments


def _warm_requests(detector: GroundingDinoDetector, segmenter: SamSegmenter, settings: Settings,
                   pictures: list[np.ndarray]) -> list[DetectionRequest]:
    requests = [DetectionRequest(image=p, phrases=["cats", "house"], box_threshold=settings.box_threshold,
                                 text_threshold=settings.text_threshold, max_detections=settings.max_detections)
                for p in pictures]
    detector.detect(requests[:1])  # warm-up
    segmenter.segment([SegmentationRequest(image=pictures[0], boxes=np.array([[0, 0, 10, 10]], np.float32))])
    return requests


def in_process_lanes_images_per_s(detector: GroundingDinoDetector, segmenter: SamSegmenter, settings: Settings,
                                  pictures: list[np.ndarray], lanes: int) -> float:
    """One image at a time (detect, then segment) on each of `lanes` threads, torch's threads split between them."""
    requests = _warm_requests(detector, segmenter, settings, pictures)
    threads = torch.get_num_threads()

    def lane(chunk: list[DetectionRequest]) -> None:
        for request in chunk:
            detections = detector.detect([request])[0]
            segmenter.segment([SegmentationRequest(image=request.image, boxes=detections.boxes)])

    torch.set_num_threads(max(1, threads // lanes))
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lane, [requests[i::lanes] for i in range(lanes)]))
        return len(requests) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def in_process_images_per_s(detector: GroundingDinoDetector, segmenter: SamSegmenter, settings: Settings,
                             pictures: list[np.ndarray], batch: int, stage_s: dict[str, float] | None = None) -> float:
    requests = _warm_requests(detector, segmenter, settings, pictures)
    stage_s = {} if stage_s is None else stage_s
    started = time.perf_counter()
    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        step = time.perf_counter()
        detections = detector.detect(chunk)
        stage_s["detect"] = stage_s.get("detect", 0.0) + time.perf_counter() - step
        step = time.perf_counter()
        masks = segmenter.segment([SegmentationRequest(image=r.image, boxes=d.boxes, encodings=(RLE,))
                                   for r, d in zip(chunk, detections)])  # RLE asked for, as the service asks
        stage_s["segment"] = stage_s.get("segment", 0.0) + time.perf_counter() - step
        step = time.perf_counter()  # the service's output work, timed apart: the bare models' figure leaves it out
        for found in masks:
            encode_masks(found, (RLE,))
        encoded = time.perf_counter() - step
        stage_s["encode"] = stage_s.get("encode", 0.0) + encoded
        started += encoded
    return len(requests) / (time.perf_counter() - started)

def in_process_reference(settings: Settings, pictures: list[np.ndarray], batches: list[int], models=None,
                         one_thread_batch: int | None = None, lanes: int = 0) -> dict:
    """The bare models' images/s at each batch size, with masks and (their detect step alone) boxes only,
    and the seconds per stage at the smallest batch size; with `lanes` > 1, also one image at a time on that
    many threads ("lanes N", with masks). `models`: (detector, segmenter) already loaded.
    `one_thread_batch`: that batch size once more with one torch thread, as a GPU replica has (Ray's default),
    to tell the CPU work around the GPU from the graph's own costs (not part of the best)."""
    detector, segmenter = models or load_models(settings)
    images_per_s, boxes_only, equal_work, stage_s = {}, {}, {}, {}
    for b in batches:
        stages: dict[str, float] = {}
        bare = in_process_images_per_s(detector, segmenter, settings, pictures, b, stages)
        images_per_s[f"batch {b}"] = round(bare, 4)
        # the same output work as the service: every mask RLE-encoded (the service overlaps it with the next batch)
        equal_work[f"batch {b}"] = round(len(pictures) / (len(pictures) / bare + stages["encode"]), 4)
        boxes_only[f"batch {b}"] = round(len(pictures) / stages["detect"], 4)
        stage_s = stage_s or stages
    if lanes > 1:
        images_per_s[f"lanes {lanes}"] = round(in_process_lanes_images_per_s(detector, segmenter, settings, pictures,
                                                                            lanes), 4)
    one_thread = {}
    if one_thread_batch:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            stages = {}
            one_thread = {"batch": one_thread_batch, "images_per_s": round(in_process_images_per_s(
                detector, segmenter, settings, pictures, one_thread_batch, stages), 4),
                "boxes_only_images_per_s": round(len(pictures) / stages["detect"], 4)}
        finally:
            torch.set_num_threads(threads)
    del detector, segmenter, models
    free_gpu_memory()
    return {"images_per_s": images_per_s, "boxes_only_images_per_s": boxes_only, "stage_s": stage_s,
            "equal_work_images_per_s": equal_work, "one_torch_thread": one_thread}


def free_gpu_memory() -> None:
    """Give what models no longer referenced held back to the GPU: the replicas started next share it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def service_load(service: ServeProcess, bodies: list[dict], counter: BatchCounter | None = None,
                 models: tuple[str, ...] = ("Detector", "Segmenter")) -> tuple[dict, dict]:
    """All `bodies` sent at once (single-task requests, one item each for `models`): the load report and the
    batch sizes the model deployments formed."""
    counter = counter or BatchCounter(service)
    report = run_load(service.url, bodies, requests=len(bodies), concurrency=len(bodies))
    return report, counter.since_last({name: len(bodies) for name in models})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-detections", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=0, help="user_config.torch_threads of the replicas")
    parser.add_argument("--max-batch-size", type=int, default=0,
                        help="replicas' max_batch_size (0: --images; -1: configs/serve.yaml as shipped)")
    parser.add_argument("--in-process-batches", default="",
                        help="comma-separated batch sizes for the in-process reference (default: 1 and --images)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--in-process-lanes", type=int, default=-1,
                        help="threads for the in-process lanes reference (-1: on CPU the usable cores, as the "
                             "Detector's cpu_lanes 0; 0 or 1: none)")
    parser.add_argument("--in-process-after", action="store_true",
                        help="measure the best in-process batch size again after the service and report the "
                             "efficiency against both: a shared machine's speed drifts between the halves of a run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    env = {**model_env(args.models), "SAM_EMBEDDING_CACHE_BYTES": "0", "MAX_DETECTIONS": str(args.max_detections),
           "DEVICE": args.device, "PRECISION": args.precision, "TASK_TIMEOUT_S": "3000"}  # CPU: minutes per batch
    allocate_like_the_replicas("benchmarks.efficiency", env)
    settings = Settings.load(env=env)
    files = distinct_images(args.images + 1)
    names = sorted(files)
    pictures = [np.asarray(Image.open(io.BytesIO(files[n])).convert("RGB")) for n in names[:args.images]]

    batches = sorted({int(b) for b in args.in_process_batches.split(",") if b} or {1, args.images})
    lanes = args.in_process_lanes
    if lanes < 0:
        lanes = usable_cores() if pick_device(settings.device).type == "cpu" else 0
    reference = in_process_reference(settings, pictures, batches, lanes=lanes)
    in_process, stage_s = reference["images_per_s"], reference["stage_s"]
    best = max(in_process.values())

    images = ImageServer(files)
    bodies = [text_prompt_body(f"{images.url}/{name}") for name in names]

    def threads(config: dict) -> None:
        if args.max_batch_size >= 0:
            user_config(max_batch_size=args.max_batch_size or args.images)(config)
        config["http_options"]["request_timeout_s"] = 3000
        for deployment in model_deployments(config):
            deployment["user_config"]["torch_threads"] = args.torch_threads

    service = start_service(env, threads)
    try:
        run_load(service.url, bodies[-1], requests=1, concurrency=1)  # warm-up, its own image
        report, histograms = service_load(service, bodies[:args.images])
        rss = replica_rss_mb(service)
    finally:
        service.stop()
        images.close()

    assert report["failures"] == 0, report
    graph = args.images / report["wall_s"]
    after = {}
    if args.in_process_after:
        kind, size = max(in_process, key=in_process.get).split()
        after = in_process_reference(settings, pictures, [int(size)] if kind == "batch" else [],
                                     lanes=int(size) if kind == "lanes" else 0)["images_per_s"]
    # Fill and drain: the first image's segment step cannot overlap an earlier detect, nor the last image's
    # detect a later segment; bounded by one image's in-process time (batch 1), reported as a share of the run.
    one_image_s = sum(stage_s.values()) / args.images if stage_s else None
    result = {
        "scenario": "serving efficiency", "models": args.models, "images": args.images,
        "max_detections": args.max_detections, "replica_torch_threads": args.torch_threads,
        "replica_max_batch_size": (args.max_batch_size or args.images) if args.max_batch_size >= 0 else "as shipped",
        "device": args.device, "precision": args.precision, **machine(),
        "in_process_images_per_s": in_process, "in_process_torch_threads": torch.get_num_threads(),
        "in_process_glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "in_process_boxes_only_images_per_s": reference["boxes_only_images_per_s"],
        "in_process_stage_s_per_image": {k: round(v / args.images, 3) for k, v in stage_s.items()},
        "fill_drain_share": round(one_image_s / report["wall_s"], 3) if one_image_s else None,
        "graph_images_per_s": round(graph, 4), "graph_load": report,
        "efficiency": round(graph / best, 3), "batch_sizes": histograms, "rss_mb": rss,
        # against the bare models doing the service's output work too: every mask RLE-encoded
        "in_process_equal_work_images_per_s": reference["equal_work_images_per_s"],
        "efficiency_equal_work": round(graph / max(reference["equal_work_images_per_s"].values()), 3),
    }
    if after:
        both = (best + max(after.values())) / 2
        result.update(in_process_after_service_images_per_s=after, efficiency_against_both=round(graph / both, 3))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
