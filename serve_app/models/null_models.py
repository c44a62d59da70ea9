"""Models that cost nothing: the service's own ceiling, with the models taken out of the measurement.

`NullDetector` returns `boxes` detections per image at once (config.json's `boxes`, default 20), spread over the
image, scores falling, phrases in turn; `NullSegmenter` returns one mask per box, the box filled: a mask of the
size a trained model's is (its RLE a few hundred bytes), not random weights' noise. They run through the same
deployments, batching, encodings and pipeline as real models (benchmarks/null_ceiling.py, issue #31's CPU-side
ceiling). serve_app.tiny_models.null.make_null_models writes their checkpoint directories.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app.models.catalog import Family
from serve_app.models.embedding_cache import EmbeddingCache
from serve_app.models.messages import DetectionRequest, Detections, Masks, SegmentationRequest
from serve_app.models.prompt_decoding import has_points
from serve_app.models.spec import ModelSpec


def _grid_boxes(count: int, height: int, width: int) -> np.ndarray:
    """`count` boxes on a grid over the image, each a cell's inner half."""
    side = max(1, int(np.ceil(np.sqrt(count))))
    cell_w, cell_h = width / side, height / side
    cells = [(i % side, i // side) for i in range(count)]
    return np.array([(x * cell_w + cell_w / 4, y * cell_h + cell_h / 4, x * cell_w + 3 * cell_w / 4,
                      y * cell_h + 3 * cell_h / 4) for x, y in cells], np.float32).reshape(-1, 4)


class NullDetector:
    def __init__(self, boxes: int = 20):
        self.boxes = boxes
        self.device = torch.device("cpu")

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "NullDetector":
        from serve_app.models.loading import read_config

        return cls(int(read_config(spec.checkpoint).get("boxes", 20)))

    def detect(self, requests: list[DetectionRequest]) -> list[Detections]:
        results = []
        for request in requests:
            count = min(self.boxes, max(0, request.max_detections)) if request.phrases else 0
            height, width = request.image.shape[:2]
            results.append(Detections(boxes=_grid_boxes(count, height, width),
                                      scores=np.linspace(0.9, 0.5, count, dtype=np.float32),
                                      phrase_ids=np.arange(count, dtype=np.int64) % max(1, len(request.phrases))))
        return results


class NullSegmenter:
    def __init__(self):
        self.device = torch.device("cpu")
        self.cache = EmbeddingCache(0)  # nothing to cache; the deployment reports its counters
        self.images_encoded = 0

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "NullSegmenter":
        return cls()

    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        results = []
        for request in requests:
            height, width = request.image.shape[:2]
            boxes = np.asarray(request.boxes, np.float32).reshape(-1, 4)
            if has_points(request):  # one mask: the first box, else a small square around the first click
                x, y = np.asarray(request.points, np.float32)[0]
                boxes = boxes[:1] if len(boxes) else np.array([[x - 8, y - 8, x + 8, y + 8]], np.float32)
            masks = np.zeros((len(boxes), height, width), bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().astype(int)):
                mask[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
            results.append(Masks(masks=masks, scores=np.ones(len(boxes), np.float32)))
        return results
