"""Every detector family the service serves, built tiny with random weights, loaded through the production code,
and checked against the family's own reference path (its processor -> model -> post-processing, one image at a
time, as its model card shows)."""

import json

import numpy as np
import pytest
import torch

from serve_app.models.errors import ModelLoadError
from serve_app.models.grounding_dino import GroundingDinoDetector, build_caption
from serve_app.models.messages import DetectionRequest
from serve_app.tiny_models.grounding_dino_sam import make_tiny_grounding_dino
from tests.imaging import pattern


@pytest.fixture(scope="module", params=["grounding-dino", "mm-grounding-dino"])
def family_model(request, tmp_path_factory):
    path = make_tiny_grounding_dino(tmp_path_factory.mktemp(request.param), seed=3, family=request.param)
    return request.param, path


def reference_boxes(path, image: np.ndarray, phrases: list[str]) -> np.ndarray:
    """All queries' boxes as transformers' own post-processing gives them, in image pixels."""
    from PIL import Image
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    inputs = processor(images=Image.fromarray(image), text=build_caption(phrases)[0], return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    [found] = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[image.shape[:2]])
    boxes = found["boxes"].numpy()
    height, width = image.shape[:2]
    return np.clip(boxes, 0, [width, height, width, height])  # the service keeps boxes inside the image


def test_each_family_loads_offline_and_matches_its_reference_path(family_model, monkeypatch):
    family, path = family_model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    detector = GroundingDinoDetector.load(str(path), device="cpu")
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    images = [pattern(240, 320, seed=1), pattern(300, 200, seed=2), pattern(240, 320, seed=4)]
    prompts = [["cats", "house"], ["a brown dog"], ["house", "cats", "tree"]]  # mixed sizes and prompts, one batch
    requests = [DetectionRequest(image=i, phrases=p, box_threshold=0.0, text_threshold=0.0, max_detections=30)
                for i, p in zip(images, prompts)]
    for request, found in zip(requests, detector.detect(requests)):
        reference = reference_boxes(path, request.image, request.phrases)
        assert len(found.boxes) == len(reference) == 30  # every query kept at threshold 0
        distance = np.abs(found.boxes[:, None, :] - reference[None, :, :]).max(axis=2)
        assert distance.min(axis=1).max() < 1e-4  # each box is one of the family's own, within 1e-4 px
        assert set(found.phrase_ids.tolist()) <= set(range(len(request.phrases)))


def test_a_family_the_service_does_not_serve_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "yolos"}))
    with pytest.raises(ModelLoadError, match=r"DETECTOR_MODEL=.*'yolos' checkpoint.*serves Grounding DINO.*OWLv2"):
        GroundingDinoDetector.load(str(tmp_path), device="cpu")
