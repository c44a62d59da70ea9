"""SAM's box decoding by SharedImageDecoder (image side shared, cross-attention in token space) against MaskDecoder.

    python -m benchmarks.sam_decoder_speed [--models full-vit_t] [--threads 1] [--boxes 20] [--repeats 5]

In-process, one 640x480 image encoded once; times only the decoder over `--boxes` random boxes in the segmenter's
chunks (2 on CPU): segment-anything's `MaskDecoder` (what `SamSegmenter` ran before) and `SharedImageDecoder`
(what it runs now), alternating, medians. Random weights in the real architecture (benchmarks.models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine
from benchmarks.models import MODEL_SETS, model_env
from serve_app.models.sam_decoder import SharedImageDecoder
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings
from tests.imaging import pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random ViT weights give subnormal activations (docs/performance.md)
    settings = Settings.load(env=model_env(args.models))
    segmenter = SamSegmenter.load(settings.segmenter_checkpoint, model_type="vit_t" if settings.use_mobile_sam else "auto")
    image = pattern(480, 640, seed=1)
    corners = np.random.default_rng(0).uniform(0, 480, (args.boxes, 2, 2)).astype(np.float32)
    boxes = segmenter.transform.apply_boxes_torch(torch.as_tensor(np.concatenate([corners.min(1), corners.max(1)], 1)),
                                                  image.shape[:2])
    chunk = segmenter.decoder_chunk
    with torch.inference_mode():
        embedding, _ = segmenter.embed([image])
        pe = segmenter.sam.prompt_encoder.get_dense_pe()

        def per_box() -> None:
            for start in range(0, len(boxes), chunk):
                sparse, dense = segmenter.sam.prompt_encoder(points=None, boxes=boxes[start:start + chunk], masks=None)
                segmenter.sam.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                           dense_prompt_embeddings=dense, multimask_output=False)

        def shared() -> None:
            sparse, dense = segmenter.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
            decoder = SharedImageDecoder(segmenter.sam.mask_decoder, embedding, pe, dense[:1])
            for start in range(0, len(boxes), chunk):
                decoder(sparse[start:start + chunk])

        timings: dict[str, list[float]] = {"MaskDecoder": [], "SharedImageDecoder": []}
        per_box(), shared()  # warm-up
        for _ in range(args.repeats):
            for name, run in (("MaskDecoder", per_box), ("SharedImageDecoder", shared)):
                started = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - started)
    medians = {name: round(statistics.median(values), 3) for name, values in timings.items()}
    result = {"benchmark": "sam decoder", "models": args.models, "threads": args.threads, "boxes": args.boxes,
              "chunk": chunk, **machine(), "median_s": medians,
              "speedup": round(medians["MaskDecoder"] / medians["SharedImageDecoder"], 2)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
