"""A SAM segmenter's image encoder eager against compiled (COMPILE_ENCODERS=on), in-process, per image.

    python -m benchmarks.compiled_encoders --models vit_t,vit_b --device cpu --out compiled-encoders-cpu.json
    python -m benchmarks.compiled_encoders --models vit_t --device cuda --precisions fp32,fp16 --modes on,cudagraphs
    python -m benchmarks.compiled_encoders --models tiny --images 2 --repeats 1      # a smoke run

For each model and precision: the segmenter as the service builds it (SamSegmenter.load, random weights in the
real architecture), eager, then compiled, which is what a replica does in its constructor; the warm-up's time is
reported as the replica's start-up cost. Inductor keeps compiled graphs on disk (TORCHINDUCTOR_CACHE_DIR, by
default under /tmp), so a second start costs less: `--cold` compiles in an empty cache directory. Each timed call
encodes one distinct image (`embed`: resize, normalise, encoder), as a Retrieve of new images does; the masks of
`--boxes` boxes are compared between the two.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _images(count: int) -> list[np.ndarray]:
    from PIL import Image

    from benchmarks.harness import distinct_images

    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in distinct_images(count).values()]


def _per_image_ms(segmenter, images: list[np.ndarray], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        for image in images:
            started = time.perf_counter()
            segmenter.embed([image])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - started) * 1000)
    return times


def _checkpoint(model: str) -> str:
    if model == "tiny":
        from serve_app.models.sam_builders import build_tiny_sam

        path = Path(tempfile.gettempdir()) / "grounded-serve-bench-tiny-sam.pth"
        if not path.exists():
            torch.manual_seed(0)
            torch.save(build_tiny_sam().state_dict(), path)
        return str(path)
    from benchmarks.models import _sam_checkpoint

    return str(_sam_checkpoint(model))


def measure(model: str, precision: str, device: torch.device, images: list[np.ndarray], repeats: int,
            boxes: int, modes: list[str]) -> list[dict]:
    from serve_app.models.messages import SegmentationRequest
    from serve_app.models.segmenter import SamSegmenter

    checkpoint = _checkpoint(model)
    eager = SamSegmenter.load(checkpoint, device=str(device), precision=precision)
    eager.embed(images[:1])  # first-call costs (allocator, oneDNN primitives) are not the encoder's
    eager_ms = _per_image_ms(eager, images, device, repeats)
    image = images[0]
    corners = np.random.default_rng(0).uniform(0, 0.85, (boxes, 2)) * image.shape[1::-1]
    box_array = np.concatenate([corners, corners + 0.12 * np.array(image.shape[1::-1])], 1).astype(np.float32)
    request = [SegmentationRequest(image=image, boxes=box_array)]
    want = eager.segment(request)[0]
    eager_median = statistics.median(eager_ms)
    rows = []
    for mode in modes:
        started = time.perf_counter()
        compiled = SamSegmenter(eager.sam, device, precision=precision, compile=mode)
        start_up_s = time.perf_counter() - started
        compiled_ms = _per_image_ms(compiled, images, device, repeats)
        got = compiled.segment(request)[0]
        compiled_median = statistics.median(compiled_ms)
        rows.append({"model": model, "precision": compiled.precision, "mode": mode, "threads": torch.get_num_threads(),
                     "compiled": compiled.encoder.active, "compiled_for_threads": list(compiled.encoder.thread_counts),
                     "eager_ms_per_image": round(eager_median, 1), "compiled_ms_per_image": round(compiled_median, 1),
                     "speed_up": round(eager_median / compiled_median, 3), "start_up_compile_s": round(start_up_s, 1),
                     "eager_ms_all": [round(t, 1) for t in eager_ms],
                     "compiled_ms_all": [round(t, 1) for t in compiled_ms],
                     "mask_pixels_differing": float(np.mean(want.masks != got.masks)),
                     "score_max_difference": float(np.max(np.abs(want.scores - got.scores)))})
        del compiled
    return rows


def main() -> None:
    from benchmarks.harness import allocate_like_the_replicas, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_t,vit_b", help="comma-separated: tiny, vit_t, vit_b, vit_l, vit_h")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (CPU with AMX), fp16")
    parser.add_argument("--modes", default="on", help="COMPILE_ENCODERS values: on, cudagraphs (CUDA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--cold", action="store_true", help="compile in an empty inductor cache directory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # the replicas' malloc tunables: without them eager passes lose much of their time to page faults, which
    # compiled code's reused buffers avoid, and the comparison would flatter compiling
    allocate_like_the_replicas("benchmarks.compiled_encoders", {})
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    device = torch.device(args.device)
    if device.type == "cpu":
        from serve_app.models.device import usable_cores

        torch.set_num_threads(usable_cores())  # a replica with the node to itself
    images = _images(args.images)
    rows = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for row in measure(model, precision, device, images, args.repeats, args.boxes, args.modes.split(",")):
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_all")}), flush=True)
    result = {"scenario": "SAM image encoder, eager against torch.compile (COMPILE_ENCODERS=on)",
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
              "device": str(device), "cold_cache": args.cold, "images": args.images, "repeats": args.repeats,
              **machine(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
