"""Each model's FLOP utilisation: FLOPs of a measured forward against the device's measured dense matmul rate.

    python -m benchmarks.flop_utilisation --models full-vit_t --device cuda --precision fp32 --out flops.json
    python -m benchmarks.flop_utilisation --models tiny --device cpu --quick          # a smoke run

- FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` over one image's detect and segment (the same
  requests as the efficiency benchmark: every box kept, `--boxes` of them). It counts matmuls and convolutions,
  not element-wise work, so memory-bound ops (deformable attention's sampling, softmax, up-sampling) add time
  and no FLOPs: that is what the utilisation is meant to show.
- The device's rate: the mean of timed square matmuls (8192 on a GPU, 1024 on CPU) in fp32, TF32 (GPU), bf16
  and fp16 (GPU), after warm-ups.
- Each model alone in-process, batch `--batch`: images/s, and on a GPU where its wall time went (torch.profiler:
  kernels running, copies, and the GPU idle while Python and the CPU side ran). On a GPU the segmenter is also
  timed with its resize and mask pixels on the host (`segmenter_pixels_on_host`), as before they moved to the GPU.
gpu_suite adds the service's utilisation from its measured images/s. `utilisation` = FLOPs/image × images/s
over the rate of the precision the models ran in (fp32 runs are also given against TF32's, which cuDNN's
convolutions use by default).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from serve_app.masks.encode import RLE
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.settings import Settings

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_tflops(device: torch.device, precision: str, size: int, repeats: int = 10) -> float:
    """Dense matmul TFLOP/s of this device at `precision`, random operands, after warm-ups."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for _ in range(3):
            a @ b
        synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        return round(2 * size**3 * repeats / (time.perf_counter() - started) / 1e12, 3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def device_rates(device: torch.device, quick: bool = False) -> dict[str, float]:
    size = 1024 if device.type == "cpu" else 8192
    size = 256 if quick else size
    precisions = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "tf32", "bf16", "fp16"]
    return {precision: matmul_tflops(device, precision, size) for precision in precisions}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def requests_for(settings: Settings, pictures: list[np.ndarray]) -> list[DetectionRequest]:
    return [DetectionRequest(image=p, phrases=["cats", "house"], box_threshold=settings.box_threshold,
                             text_threshold=settings.text_threshold, max_detections=settings.max_detections)
            for p in pictures]


def flops_per_image(detector, segmenter, settings: Settings, picture: np.ndarray) -> dict[str, int]:
    request = requests_for(settings, [picture])
    counter = FlopCounterMode(display=False)
    with counter:
        detections = detector.detect(request)
    flops = {"detector": int(counter.get_total_flops())}
    if segmenter is not None:
        counter = FlopCounterMode(display=False)
        with counter:
            segmenter.segment([SegmentationRequest(image=picture, boxes=detections[0].boxes)])
        flops["segmenter"] = int(counter.get_total_flops())
        flops["boxes"] = len(detections[0].boxes)
    return flops


def model_rates(detector, segmenter, settings: Settings, pictures: list[np.ndarray], batch: int) -> dict:
    """Each model alone, batches of `batch`, each warmed up first: images/s, and on a GPU the profile of one
    batch. The segmenter gets the boxes the detector found."""
    device = detector.device
    requests = requests_for(settings, pictures)
    detector.detect(requests[:batch])
    steps = {"detector": (detector.detect, requests)}
    if segmenter is not None:
        found = [d.boxes for chunk in _chunks(requests, batch) for d in detector.detect(chunk)]
        # RLE asked for, as the service asks: on a GPU the masks then come back as run starts
        prompts = [SegmentationRequest(image=r.image, boxes=boxes, encodings=(RLE,)) for r, boxes in zip(requests, found)]
        segmenter.segment(prompts[:batch])
        steps["segmenter"] = (segmenter.segment, prompts)
        if getattr(segmenter, "pixels_on_device", False):  # the same with resize and masks on the host, as before
            steps["segmenter_pixels_on_host"] = (functools.partial(_pixels_on_host, segmenter), prompts)
    result = {}
    for name, (step, items) in steps.items():
        synchronize(device)
        started = time.perf_counter()
        for chunk in _chunks(items, batch):
            step(chunk)
        synchronize(device)
        result[name] = {"images_per_s": round(len(items) / (time.perf_counter() - started), 3), "batch": batch}
        if device.type == "cuda":
            result[name]["one_batch"] = gpu_time_split(lambda: step(items[:batch]), device)
    return result


def _pixels_on_host(segmenter, prompts: list[SegmentationRequest]):
    segmenter.pixels_on_device = False
    try:
        return segmenter.segment(prompts)
    finally:
        segmenter.pixels_on_device = True


def _chunks(items: list, size: int):
    return [items[start:start + size] for start in range(0, len(items), size)]


def gpu_time_split(call, device: torch.device) -> dict[str, float]:
    """Where one call's wall time went on the GPU: kernels running, copies, and the rest, when the GPU waited
    for the CPU side (Python, launches, host work) or for a synchronising copy."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        call()
        synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1000
    kernels, copies = [], []
    for event in profiler.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (event.time_range.start, event.time_range.end)
        (copies if "memcpy" in event.name.lower() or "memset" in event.name.lower() else kernels).append(span)
    kernel_ms, copy_ms = _covered_ms(kernels), _covered_ms(copies)
    return {"wall_ms": round(wall_ms, 2), "kernels_ms": round(kernel_ms, 2), "copies_ms": round(copy_ms, 2),
            "gpu_waiting_ms": round(max(0.0, wall_ms - kernel_ms - copy_ms), 2),
            "kernel_busy": round(kernel_ms / wall_ms, 3) if wall_ms else 0.0}


def _covered_ms(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) spans in microseconds, as milliseconds: overlapping kernels once."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total / 1000


def utilisation(flops: int, images_per_s: float, tflops: float) -> float:
    return round(flops * images_per_s / (tflops * 1e12), 4) if tflops else 0.0


def report(detector, segmenter, settings: Settings, pictures: list[np.ndarray], batch: int,
           quick: bool = False) -> dict:
    device = detector.device
    flops = flops_per_image(detector, segmenter, settings, pictures[0])
    rates = device_rates(device, quick)
    alone = model_rates(detector, segmenter, settings, pictures, batch)
    precision = settings.precision
    against = [precision] + (["tf32"] if precision == "fp32" and "tf32" in rates else [])
    for name, measured in alone.items():
        model_flops = flops[name.split("_")[0]]  # segmenter_pixels_on_host: the segmenter's
        measured["utilisation"] = {p: utilisation(model_flops, measured["images_per_s"], rates[p]) for p in against}
    return {"device": str(device), "precision": precision, "flops_per_image": flops, "matmul_tflops": rates,
            "in_process": alone, "against": against}


def with_service(result: dict, service_images_per_s: float) -> dict:
    """The service's utilisation per model: every image it answered went through each model once."""
    rates = result["matmul_tflops"]
    result["service"] = {"images_per_s": round(service_images_per_s, 3), "utilisation": {
        name: {p: utilisation(flops, service_images_per_s, rates[p]) for p in result["against"]}
        for name, flops in result["flops_per_image"].items() if name != "boxes"}}
    return result


def main() -> None:
    from benchmarks.harness import distinct_images, machine
    from benchmarks.models import MODEL_SETS, model_env
    from benchmarks.pipeline import load_models

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small sizes: runs, measures nothing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch = 2, 2
    env = {**model_env(args.models), "DEVICE": args.device, "PRECISION": args.precision, "BOX_THRESHOLD": "0",
           "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": str(args.boxes), "SAM_EMBEDDING_CACHE_BYTES": "0"}
    settings = Settings.load(env=env)
    files = distinct_images(args.images)
    pictures = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in files.values()]
    detector, segmenter = load_models(settings)
    result = {"scenario": "flop utilisation", "models": args.models, **machine(),
              **report(detector, segmenter, settings, pictures, args.batch, args.quick)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
