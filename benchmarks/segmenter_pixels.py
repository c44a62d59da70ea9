"""Where a SAM segmenter's pixel work costs what: on the host, one thread (as a GPU replica's CPU side runs it), and
on the device (serve_app.models.pil_resize, serve_app.models.device_masks), step by step, per image.

    python -m benchmarks.segmenter_pixels --device cuda --out segmenter-pixels.json
    python -m benchmarks.segmenter_pixels --device cpu --quick --repeats 1         # a smoke run

Each image gets `--boxes` boxes; MobileSAM's real decoder gives the low-resolution logits, with random weights
(noise masks) and compact_masks' weights (masks of a trained model's size). The steps:
- resize: the image to the encoder's 1024 px long side (host: Pillow through segment-anything; device: the same
  bytes, the original image copied over first);
- up-sample: the logits to full-resolution masks (host: the windowed float64 path; device: SAM's own);
- RLE: the masks to Label Studio's RLE (host: scan every pixel; device: find run starts there, copy them, and
  write the records on the host).
The models' own compute is not here: benchmarks.flop_utilisation times each model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _timed(call, device: torch.device, repeats: int) -> float:
    """Milliseconds per call, the device synchronised around the calls."""
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round((time.perf_counter() - started) * 1000 / repeats, 3)


def measure(segmenter, image: np.ndarray, boxes: np.ndarray, device: torch.device, repeats: int) -> dict:
    from serve_app.masks.rle import mask_to_rle, runs_to_rle
    from serve_app.models.device_masks import DeviceMasks, to_host, upsample_on_device
    from serve_app.models.mask_upsampling import upsample_masks
    from serve_app.models.pil_resize import resize_like_pil

    sam, transform = segmenter.sam, segmenter.transform
    size = transform.get_preprocess_shape(image.shape[0], image.shape[1], transform.target_length)
    with torch.inference_mode():
        embedding = sam.image_encoder(segmenter.sam.preprocess(
            torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None].float()))
        sparse, dense = sam.prompt_encoder(points=None, boxes=transform.apply_boxes_torch(
            torch.as_tensor(boxes), image.shape[:2]), masks=None)
        low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
    low_res, encoder = low_res[:, 0], sam.image_encoder.img_size
    host_masks = upsample_masks(low_res, size, image.shape[:2], encoder)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a GPU replica's CPU side: one thread
    try:
        host = {"resize_ms": _timed(lambda: transform.apply_image(image), cpu, repeats),
                "upsample_ms": _timed(lambda: upsample_masks(low_res, size, image.shape[:2], encoder), cpu, repeats),
                "rle_ms": _timed(lambda: [mask_to_rle(mask) for mask in host_masks], cpu, repeats)}
    finally:
        torch.set_num_threads(threads)
    pixels = torch.as_tensor(image.copy())  # writable: torch warns on read-only arrays
    on_device = low_res.to(device)
    device_masks = upsample_on_device(on_device, size, image.shape[:2], encoder)
    runs = to_host([DeviceMasks(device_masks, torch.zeros(len(boxes), device=device), True)])[0].runs

    def copy_and_resize():
        return resize_like_pil(pixels.to(device), size)

    moved = {"resize_ms": _timed(copy_and_resize, device, repeats),
             "upsample_ms": _timed(lambda: upsample_on_device(on_device, size, image.shape[:2], encoder), device,
                                   repeats),
             "runs_ms": _timed(lambda: to_host([DeviceMasks(device_masks, torch.zeros(len(boxes), device=device),
                                                            True)]), device, repeats),
             "rle_from_runs_ms": _timed(lambda: [runs_to_rle(r) for r in runs], cpu, repeats)}
    same = all(np.array_equal(runs_to_rle(r), mask_to_rle(m)) for r, m in zip(runs, device_masks.cpu().numpy()))
    return {"image": list(image.shape[:2]), "boxes": len(boxes), "host_one_thread": host, "device": moved,
            "host_total_ms": round(sum(host.values()), 3), "device_total_ms": round(sum(moved.values()), 3),
            "host_cpu_ms_left": moved["rle_from_runs_ms"], "rle_bytes_per_mask": round(float(np.mean(
                [mask_to_rle(m).nbytes for m in host_masks])), 1), "device_rle_equals_host_encoding": same}


def main() -> None:
    from benchmarks.harness import distinct_images, machine
    from benchmarks.models import _sam_checkpoint, compact_masks
    from serve_app.models.segmenter import SamSegmenter
    from PIL import Image
    import io

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the 640×480 image alone")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    picture = np.asarray(Image.open(io.BytesIO(next(iter(distinct_images(1).values())))).convert("RGB"))
    photo = np.asarray(Image.fromarray(picture).resize((4032, 3024), Image.BILINEAR))  # a 12-megapixel photo
    images = [picture] if args.quick else [picture, photo]
    repeats = args.repeats
    rows = []
    mobile_sam = _sam_checkpoint("vit_t")
    for masks, checkpoint in (("noise", mobile_sam), ("compact", compact_masks(mobile_sam))):
        segmenter = SamSegmenter.load(str(checkpoint), device="cpu")
        for image in images:
            corners = np.random.default_rng(0).uniform(0, 0.85, (args.boxes, 2)) * image.shape[1::-1]
            boxes = np.concatenate([corners, corners + 0.12 * np.array(image.shape[1::-1])], 1).astype(np.float32)
            rows.append({"masks": masks, **measure(segmenter, image, boxes, device, repeats)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"scenario": "segmenter pixel work, host against device", "device": str(device), **machine(),
              "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
