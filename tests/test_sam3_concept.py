"""SAM 3 as a concept segmenter (serve_app.models.sam3_concept) on tiny random-weight checkpoints built here and
loaded offline through the production loading code: parity with transformers' own processor -> model ->
post-processing path, the vision-feature cache shared by text prompts and clicks, and its byte accounting."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from serve_app.models.errors import ModelLoadError
from serve_app.models.messages import DetectionRequest, Detections, SegmentationRequest

SIZES = [(90, 160), (200, 120), (64, 64)]  # H x W: wide, tall, square
PROMPTS = [["cat"], ["a red dog", "tree", "cat"], ["person", "car"]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from serve_app.tiny_models.sam3 import make_tiny_sam3, make_tiny_sam3_video

    root = tmp_path_factory.mktemp("sam3")
    return {"sam3": make_tiny_sam3(root / "sam3"), "sam3_video": make_tiny_sam3_video(root / "sam3_video")}


@pytest.fixture(scope="module")
def load(checkpoints):
    from serve_app.models.sam3_concept import Sam3Concept

    def _load(kind="sam3_video", cache_bytes=1 << 30, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_HUB_OFFLINE", "1")
            return Sam3Concept.load(str(checkpoints[kind]), device="cpu", cache_bytes=cache_bytes, **kwargs)

    return _load


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [(rng.random((*size, 3)) * 255).astype(np.uint8) for size in SIZES]


def _reference(model, image: np.ndarray, phrase: str | None, threshold: float, boxes=None, box_labels=None):
    """transformers' documented path, one image and one phrase at a time (with its exemplar boxes, xyxy pixels,
    and their labels, as Sam3Processor takes them), plus the full-size mask probabilities."""
    processor = model.processor
    exemplars = {} if boxes is None else {"input_boxes": [[list(map(float, box)) for box in boxes]],
                                          "input_boxes_labels": [[int(label) for label in box_labels]]}
    inputs = processor(images=Image.fromarray(image), text=phrase, return_tensors="pt", **exemplars)
    with torch.inference_mode():
        out = model.model(**inputs)
    size = image.shape[:2]
    result = processor.post_process_instance_segmentation(out, threshold=threshold, mask_threshold=0.5,
                                                          target_sizes=[size])[0]
    scores = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()
    keep = scores[0] > threshold
    probabilities = F.interpolate(out.pred_masks[0, keep][None].sigmoid(), size=size, mode="bilinear",
                                  align_corners=False)[0]
    boxes = result["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
    return boxes.numpy(), result["scores"].numpy(), result["masks"].numpy().astype(bool), probabilities.numpy()


def test_detect_matches_transformers_post_processing_on_a_mixed_batch(load, images):
    model = load(cache_bytes=0)
    requests = [DetectionRequest(image=image, phrases=phrases, box_threshold=0.0, image_key=f"img{i}")
                for i, (image, phrases) in enumerate(zip(images, PROMPTS))]
    results = model.detect(requests)
    assert model.images_encoded == len(images)  # one encoder run per image, whatever the phrases
    for request, got in zip(requests, results):
        height, width = request.image.shape[:2]
        assert got.masks.shape == (len(got), height, width) and got.masks.dtype == bool
        assert np.all(np.diff(got.scores) <= 0)  # highest first, across phrases
        total = sum(_assert_matches(got, phrase_id, _reference(model, request.image, phrase, 0.0))
                    for phrase_id, phrase in enumerate(request.phrases))
        assert len(got) == total


def _assert_matches(got: Detections, phrase_id: int, reference) -> int:
    boxes, scores, masks, probabilities = reference
    mine = np.flatnonzero(got.phrase_ids == phrase_id)
    assert len(mine) == len(scores)
    used = set()
    for index in mine:  # match each detection to the reference one with the nearest box
        distance = np.abs(boxes - got.boxes[index]).max(axis=1)
        match = int(distance.argmin())
        assert match not in used
        used.add(match)
        assert distance[match] < 1e-4
        assert abs(scores[match] - got.scores[index]) < 1e-5
        differ = masks[match] != got.masks[index]
        assert np.all(np.abs(probabilities[match][differ] - 0.5) < 1e-5)
    return len(scores)


def test_exemplar_boxes_match_transformers_with_and_without_text(load, images):
    """Positive and negative exemplar boxes, with a phrase and alone ("visual"), beside a text-only phrase whose
    result must not change for sharing the request."""
    model = load(cache_bytes=0)
    image = images[1]  # 200 x 120
    request = DetectionRequest(
        image=image, phrases=["cat", "", "tree"], box_threshold=0.0,
        exemplar_boxes=np.array([[10, 20, 60, 90], [70, 100, 110, 190], [5, 5, 40, 40]], np.float32),
        exemplar_labels=np.array([1, 0, 1]), exemplar_phrases=np.array([0, 0, 1]))
    got = model.detect([request])[0]
    total = _assert_matches(got, 0, _reference(model, image, "cat", 0.0, [[10, 20, 60, 90], [70, 100, 110, 190]],
                                               [1, 0]))
    total += _assert_matches(got, 1, _reference(model, image, None, 0.0, [[5, 5, 40, 40]], [1]))
    total += _assert_matches(got, 2, _reference(model, image, "tree", 0.0))
    assert len(got) == total and np.all(np.diff(got.scores) <= 0)
    text_only = model.detect([DetectionRequest(image=image, phrases=["cat", "", "tree"], box_threshold=0.0)])[0]
    assert not np.array_equal(text_only.scores[text_only.phrase_ids == 0], got.scores[got.phrase_ids == 0])


def test_batch_independence_and_max_detections(load, images):
    model = load(cache_bytes=0)
    requests = [DetectionRequest(image=image, phrases=phrases, box_threshold=0.0)
                for image, phrases in zip(images, PROMPTS)]
    together = model.detect(requests)
    for request, batched in zip(requests, together):
        alone = model.detect([request])[0]
        np.testing.assert_allclose(alone.boxes, batched.boxes, atol=1e-4)
        np.testing.assert_allclose(alone.scores, batched.scores, atol=1e-5)
        np.testing.assert_array_equal(alone.phrase_ids, batched.phrase_ids)
        assert (alone.masks != batched.masks).mean() < 1e-3

    full = together[1]
    capped = model.detect([DetectionRequest(image=images[1], phrases=PROMPTS[1], box_threshold=0.0,
                                            max_detections=5)])[0]
    assert len(capped) == 5 and capped.masks.shape[0] == 5
    np.testing.assert_allclose(capped.scores, full.scores[:5], atol=1e-6)
    np.testing.assert_array_equal(capped.phrase_ids, full.phrase_ids[:5])
    np.testing.assert_array_equal(capped.masks, full.masks[:5])

    model.phrase_chunk = 2  # 3 phrases in 2 forwards: the best 7 kept across them
    chunked = model.detect([DetectionRequest(image=images[1], phrases=PROMPTS[1], box_threshold=0.0,
                                             max_detections=7)])[0]
    np.testing.assert_allclose(chunked.scores, full.scores[:7], atol=1e-6)
    np.testing.assert_array_equal(chunked.phrase_ids, full.phrase_ids[:7])
    np.testing.assert_array_equal(chunked.masks, full.masks[:7])

    threshold = float(np.median(full.scores))
    above = model.detect([DetectionRequest(image=images[1], phrases=PROMPTS[1], box_threshold=threshold)])[0]
    assert len(above) == int((full.scores > threshold).sum()) and np.all(above.scores > threshold)

    nothing = model.detect([DetectionRequest(image=images[0], phrases=[]),
                            DetectionRequest(image=images[0], phrases=["cat"], box_threshold=1.0)])
    assert [len(d) for d in nothing] == [0, 0] and nothing[0].masks.shape == (0, *SIZES[0])


def test_a_click_after_text_on_the_same_image_reuses_the_encoding(load, images):
    model = load()
    image = images[0]
    model.detect([DetectionRequest(image=image, phrases=["cat", "dog"], image_key="same")])
    assert model.images_encoded == 1
    click = SegmentationRequest(image=image, boxes=np.zeros((0, 4)), image_key="same",
                                points=np.array([[80.0, 45.0]]), point_labels=np.array([1]))
    clicked = model.segment([click])[0]
    assert model.images_encoded == 1 and clicked.cache_hit
    assert clicked.masks.shape == (1, *image.shape[:2]) and clicked.masks.dtype == bool

    # and the same masks as the tracker run from the pixels, through transformers' processor
    from transformers import Sam3TrackerProcessor

    processor = Sam3TrackerProcessor(image_processor=model.image_processor)
    inputs = processor(images=Image.fromarray(image), input_points=[[[[80.0, 45.0]]]], input_labels=[[[1]]],
                       return_tensors="pt")
    with torch.inference_mode():
        out = model.tracker(**inputs, multimask_output=True)
    best = int(out.iou_scores[0, 0].argmax())
    reference = processor.post_process_masks(out.pred_masks, inputs["original_sizes"])[0][0, best].numpy()
    assert (reference != clicked.masks[0]).mean() < 1e-3
    assert abs(float(out.iou_scores[0, 0, best]) - float(clicked.scores[0])) < 1e-5

    boxes = model.segment([SegmentationRequest(image=image, boxes=np.array([[10, 10, 100, 70], [0, 0, 40, 40.0]]),
                                               image_key="same")])[0]
    assert boxes.masks.shape == (2, *image.shape[:2]) and boxes.cache_hit and model.images_encoded == 1

    # the other order: a click first, then text, on a new image
    model.segment([SegmentationRequest(image=images[1], boxes=np.array([[5, 5, 50, 50.0]]), image_key="other")])
    model.detect([DetectionRequest(image=images[1], phrases=["tree"], image_key="other")])
    assert model.images_encoded == 2


def test_cached_features_are_owned_copies_counted_at_their_true_size(load, images):
    model = load()
    model.detect([DetectionRequest(image=image, phrases=["cat"], image_key=f"k{i}") for i, image in enumerate(images)])
    entries = [model.cache.get(f"k{i}") for i in range(len(images))]
    assert all(entry is not None for entry in entries)
    total = 0
    for entry in entries:
        assert set(entry.embedding) == {"detector", "tracker"}  # no per-image position encodings
        tensors = [*entry.embedding["detector"], *entry.embedding["tracker"]]
        assert all(t.shape[0] == 1 and t.dtype == torch.float32 for t in tensors)
        owned = sum(t.untyped_storage().nbytes() for t in tensors)  # a view of a batch would own more
        assert entry.nbytes == owned == sum(t.numel() * 4 for t in tensors)
        total += entry.nbytes
    assert model.cache.bytes == total == len(images) * entries[0].nbytes
    # detector: the 4x, 2x and 1x levels of the feature grid, fpn_hidden_size channels each (the 0.5x level and
    # the ViT trunk are not read again)
    config = model.model.config.vision_config
    grid = config.backbone_config.image_size // config.backbone_config.patch_size
    assert [tuple(t.shape) for t in entries[0].embedding["detector"]] == [
        (1, config.fpn_hidden_size, grid * s, grid * s) for s in (4, 2, 1)]
    assert len(model._position_encoding) == 3  # one copy for the model, not one per image

    small = load(cache_bytes=entries[0].nbytes * 2)  # room for two: the third evicts the first
    small.detect([DetectionRequest(image=image, phrases=["cat"], image_key=f"k{i}") for i, image in enumerate(images)])
    assert small.cache.stats()["entries"] == 2 and small.cache.bytes == 2 * entries[0].nbytes
    assert "k0" not in small.cache


def test_a_detector_only_checkpoint_detects_and_refuses_clicks(load, images):
    from serve_app.models.sam3_concept import InteractiveUnavailable

    model = load("sam3")
    assert not model.interactive
    assert len(model.detect([DetectionRequest(image=images[0], phrases=["cat"], box_threshold=0.0)])[0]) > 0
    with pytest.raises(InteractiveUnavailable, match="sam3_video"):
        model.segment([SegmentationRequest(image=images[0], boxes=np.array([[0, 0, 10, 10.0]]))])
    empty = model.segment([SegmentationRequest(image=images[0], boxes=np.zeros((0, 4)))])[0]
    assert empty.masks.shape == (0, *SIZES[0])


def test_load_errors_name_detector_model(checkpoints, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from serve_app.models.sam3_concept import Sam3Concept

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="DETECTOR_MODEL"):
        Sam3Concept.load(str(tmp_path / "missing"), device="cpu")

    partial = tmp_path / "partial"
    partial.mkdir()
    for file in checkpoints["sam3"].iterdir():
        (partial / file.name).write_bytes(file.read_bytes())
    weights = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("mask_decoder.")}, partial / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="DETECTOR_MODEL=.*lacks"):
        Sam3Concept.load(str(partial), device="cpu")

    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({"model_type": "sam2", "architectures": ["Sam2Model"]}))
    with pytest.raises(ModelLoadError, match="DETECTOR_MODEL=.*'sam2'"):
        Sam3Concept.load(str(partial), device="cpu")
    assert config["model_type"] == "sam3"


def test_detections_with_masks_pickle_packed():
    masks = np.random.default_rng(0).random((3, 37, 53)) > 0.5
    detections = Detections(boxes=np.zeros((3, 4), np.float32), scores=np.ones(3, np.float32),
                            phrase_ids=np.arange(3), masks=masks)
    data = pickle.dumps(detections)
    assert len(data) < masks.size // 4
    back = pickle.loads(data)
    np.testing.assert_array_equal(back.masks, masks)
    assert pickle.loads(pickle.dumps(Detections())).masks is None


def test_masks_made_on_the_device_equal_the_host_path(load, images):
    """A GPU replica's path (masks up-sampled there; RLE alone comes back as run starts), run here on the CPU: the
    same detections, masks and RLE bytes for text prompts, and the same masks for clicks."""
    from serve_app.masks.encode import RLE, encode_masks
    from serve_app.masks.rle import mask_to_rle
    from serve_app.models.sam3_concept import Sam3Concept

    host = load()
    device = Sam3Concept(host.model, host.processor, host.device, tracker=host.tracker, pixels_on_device=True)
    requests = [DetectionRequest(image=image, phrases=phrases, box_threshold=0.0, text_threshold=0.0,
                                 max_detections=5, image_key=f"i{n}")
                for n, (image, phrases) in enumerate(zip(images, PROMPTS))]
    expected = host.detect(requests)
    assert all(len(found) and found.masks.any() and not found.masks.all() for found in expected)
    for want, got in zip(expected, device.detect(requests)):
        assert np.array_equal(got.boxes, want.boxes) and np.array_equal(got.masks, want.masks)
    for request in requests:
        request.encodings = (RLE,)
    for want, got in zip(expected, device.detect(requests)):
        assert got.masks is None and got.encoded.runs is not None and np.array_equal(got.scores, want.scores)
        assert [r.tolist() for r in encode_masks(got.encoded, (RLE,)).rle] == \
            [mask_to_rle(mask).tolist() for mask in want.masks]
    click = SegmentationRequest(image=images[0], boxes=np.array([[10, 10, 80, 60]], np.float32), image_key="i0",
                                points=np.array([[40.0, 30.0]], np.float32), point_labels=np.array([1]))
    [want], [got] = host.segment([click]), device.segment([click])
    assert np.array_equal(got.masks, want.masks)
