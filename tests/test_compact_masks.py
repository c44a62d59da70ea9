"""benchmarks.models.compact_masks: the same MobileSAM (random weights) with masks of a trained model's size, so a
GPU run can report the service's own work beside the noise masks' worst case."""

import io

import numpy as np
from PIL import Image

from benchmarks.harness import distinct_images
from benchmarks.models import _sam_checkpoint, compact_masks
from serve_app.graph_plan import plan_graph
from serve_app.masks.rle import mask_to_rle
from serve_app.models.loading import load
from serve_app.models.messages import SegmentationRequest
from serve_app.settings import Settings


def mean_rle_bytes(checkpoint, picture, boxes) -> float:
    settings = Settings.load(env={"USE_MOBILE_SAM": "true", "MOBILESAM_CHECKPOINT": str(checkpoint), "DEVICE": "cpu"})
    masks = load(plan_graph(settings).segmenter).segment([SegmentationRequest(image=picture, boxes=boxes)])[0]
    return float(np.mean([mask_to_rle(mask).nbytes for mask in masks.masks]))


def test_compact_mobile_sam_masks_are_a_trained_models_size():
    picture = np.asarray(Image.open(io.BytesIO(next(iter(distinct_images(1).values())))).convert("RGB"))
    corners = np.random.default_rng(0).uniform(0, [540, 380], (8, 2))
    boxes = np.concatenate([corners, corners + 80], 1).astype(np.float32)
    noise = mean_rle_bytes(_sam_checkpoint("vit_t"), picture, boxes)
    compact = mean_rle_bytes(compact_masks(_sam_checkpoint("vit_t")), picture, boxes)
    assert noise > 20_000  # random weights: tens of KB of runs a 640x480 mask
    assert compact < 5_000  # a trained model's mask: about 1.4 KB
