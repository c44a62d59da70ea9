"""Reduced precision against fp32 on the same models and images: speed, and how far boxes and masks drift.

    python -m benchmarks.precision [--models full-vit_t] [--images 4] [--precisions bf16]
    python -m benchmarks.precision --device cuda --precisions fp16,bf16       # on a GPU machine

In-process, the bare GroundingDinoDetector and SamSegmenter (as the replicas run them), one image at a time.
Each precision runs the same images; drift is measured against fp32's outputs:
- boxes: every fp32 box (BOX_THRESHOLD=0, the top `--max-detections`) matched to the closest box of the other
  precision by IoU; median IoU, the share matched at IoU >= 0.9, and the largest score difference of a pair;
- embeddings: SAM's image embedding, relative L2 error;
- masks: the fp32 boxes segmented in both precisions (equal prompts), per-mask IoU, and the share of pixels
  that differ.
Random weights give noise outputs, so drift here is numerical (what a trained model's margins must absorb),
not a change of accuracy.
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
from benchmarks.pipeline import load_models
from serve_app.models.device import cpu_bf16_instructions, effective_precision
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.settings import Settings
from tests.imaging import pattern


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 4) x (m, 4) xyxy -> (n, m)."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area = lambda boxes: np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def run(detector, segmenter, pictures, precision: str, max_detections: int, reference=None) -> dict:
    detector.precision = effective_precision(detector.device, precision)
    segmenter.precision = effective_precision(segmenter.device, precision)
    if precision != "fp32" and "fp32" in (detector.precision, segmenter.precision):
        return {"precision": precision, "skipped": "not supported on this device"}
    requests = [DetectionRequest(image=p, phrases=["cats", "house"], box_threshold=0.0, text_threshold=0.0,
                                 max_detections=max_detections) for p in pictures]
    detector.detect(requests[:1])  # warm-up: kernels and autocast caches
    segmenter.embed(pictures[:1])
    detect_s, embed_s, segment_s, detections, embeddings, masks = [], [], [], [], [], []
    for i, (picture, request) in enumerate(zip(pictures, requests)):
        started = time.perf_counter()
        [found] = detector.detect([request])
        detect_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        embedding, _ = segmenter.embed([picture])
        embed_s.append(time.perf_counter() - started)
        boxes = reference["detections"][i].boxes if reference else found.boxes  # equal prompts for the masks
        started = time.perf_counter()
        [segmented] = segmenter.segment([SegmentationRequest(image=picture, boxes=boxes)])
        segment_s.append(time.perf_counter() - started)
        detections.append(found)
        embeddings.append(embedding.float())
        masks.append(segmented.masks)
    result = {"precision": precision, "detect_s": [round(x, 4) for x in detect_s],
              "embed_s": [round(x, 4) for x in embed_s], "segment_s": [round(x, 4) for x in segment_s],
              "detect_median_s": round(statistics.median(detect_s), 4),
              "segment_median_s": round(statistics.median(segment_s), 4),
              "detections": detections, "embeddings": embeddings, "masks": masks}
    if reference:
        result["drift"] = drift(reference, result)
    return result


def drift(reference: dict, other: dict) -> dict:
    ious, score_diffs, embedding_errors, mask_ious, pixel_diffs = [], [], [], [], []
    for ref, got in zip(reference["detections"], other["detections"]):
        if len(ref.boxes) and len(got.boxes):
            overlap = box_iou(ref.boxes, got.boxes)
            best = overlap.argmax(axis=1)
            ious.extend(overlap[np.arange(len(best)), best].tolist())
            score_diffs.extend(np.abs(ref.scores - got.scores[best]).tolist())
    for ref, got in zip(reference["embeddings"], other["embeddings"]):
        embedding_errors.append(float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)))
    for ref, got in zip(reference["masks"], other["masks"]):
        for a, b in zip(ref, got):
            union = np.logical_or(a, b).sum()
            mask_ious.append(float(np.logical_and(a, b).sum() / union) if union else 1.0)
            pixel_diffs.append(float(np.mean(a != b)))
    return {
        "box_iou_median": round(statistics.median(ious), 4) if ious else None,
        "boxes_matched_iou_0.9": round(float(np.mean(np.asarray(ious) >= 0.9)), 4) if ious else None,
        "score_abs_diff_max": round(max(score_diffs), 5) if score_diffs else None,
        "embedding_rel_error_median": round(statistics.median(embedding_errors), 5),
        "mask_iou_median": round(statistics.median(mask_ious), 4) if mask_ious else None,
        "mask_iou_min": round(min(mask_ious), 4) if mask_ious else None,
        "mask_pixels_differing": round(float(np.mean(pixel_diffs)), 6) if pixel_diffs else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-detections", type=int, default=20)
    parser.add_argument("--precisions", default="bf16", help="compared with fp32, comma-separated")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    settings = Settings.load(env={**model_env(args.models), "DEVICE": args.device})
    detector, segmenter = load_models(settings)
    pictures = [pattern(480, 640, seed=1000 + i) for i in range(args.images)]
    reference = run(detector, segmenter, pictures, "fp32", args.max_detections)
    runs = [run(detector, segmenter, pictures, p, args.max_detections, reference)
            for p in args.precisions.split(",") if p and p != "fp32"]
    summary = {"benchmark": "precision", "models": args.models, "device": str(detector.device),
               "cpu_bf16_instructions": cpu_bf16_instructions(), "images": args.images,
               "max_detections": args.max_detections, **machine(), "runs": []}
    for result in [reference, *runs]:
        row = {k: v for k, v in result.items() if k not in ("detections", "embeddings", "masks")}
        if "detect_median_s" in result:
            row["speedup_vs_fp32"] = round(
                (reference["detect_median_s"] + reference["segment_median_s"])
                / (result["detect_median_s"] + result["segment_median_s"]), 3)
        summary["runs"].append(row)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
