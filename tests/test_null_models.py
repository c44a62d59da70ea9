"""The null models load through the catalog like any family and run through the real deployments' code paths: what
benchmarks/null_ceiling.py measures is the service, not a shortcut."""

from __future__ import annotations

import asyncio

import numpy as np

from serve_app.models.catalog import DETECTOR, SEGMENTER
from serve_app.models.loading import load
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.models.null_models import NullDetector, NullSegmenter
from serve_app.models.spec import ModelSpec
from serve_app.tiny_models.null import make_null_models


def test_null_models_load_through_the_catalog_and_give_n_boxes_with_compact_masks(tmp_path):
    from serve_app.masks.rle import mask_to_rle

    paths = make_null_models(tmp_path, boxes=7)
    detector = load(ModelSpec(DETECTOR, str(paths["null_detector"]), device="cpu"))
    segmenter = load(ModelSpec(SEGMENTER, str(paths["null_segmenter"]), "SEGMENTER_MODEL", device="cpu"))
    assert isinstance(detector, NullDetector) and isinstance(segmenter, NullSegmenter)
    image = np.zeros((480, 640, 3), np.uint8)
    [found] = detector.detect([DetectionRequest(image=image, phrases=["a", "b"], max_detections=50)])
    assert len(found) == 7 and set(found.phrase_ids.tolist()) == {0, 1} and np.all(np.diff(found.scores) <= 0)
    assert np.all(found.boxes[:, 2] <= 640) and np.all(found.boxes[:, 3] <= 480)
    [masks] = segmenter.segment([SegmentationRequest(image=image, boxes=found.boxes)])
    assert masks.masks.shape == (7, 480, 640) and all(mask.any() for mask in masks.masks)
    assert max(len(mask_to_rle(mask)) for mask in masks.masks) < 2_000  # a trained model's size, not noise's
    [capped] = detector.detect([DetectionRequest(image=image, phrases=["a"], max_detections=3)])
    assert len(capped) == 3


def test_the_detector_deployment_runs_the_null_model(tmp_path):
    from serve_app.deployments.detector import Detector

    paths = make_null_models(tmp_path, boxes=4)
    deployment = Detector.func_or_class(ModelSpec(DETECTOR, str(paths["null_detector"]), device="cpu"))
    found = asyncio.run(deployment.detect(DetectionRequest(image=np.zeros((48, 64, 3), np.uint8), phrases=["a"])))
    assert len(found) == 4
