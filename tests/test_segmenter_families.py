"""Every transformers SAM family the service serves (SAM 2 / 2.1, SAM-HQ, EdgeTAM, SAM), built tiny with random
weights, loaded through the production code offline, and checked against the family's own reference path (its
processor -> model -> post_process_masks, one image at a time, as its model card shows)."""

import json

import numpy as np
import pytest
import torch

from serve_app.models.errors import ModelLoadError
from serve_app.models.hf_segmenter import HfSamSegmenter
from serve_app.models.messages import SegmentationRequest
from serve_app.tiny_models.grounding_dino_sam import SAM_FAMILY_TYPES, make_tiny_grounding_dino, make_tiny_sam_family
from tests.imaging import pattern

LOGIT_TOLERANCE = 1e-5  # masks must agree except where the reference logit is this close to the threshold


@pytest.fixture(scope="module", params=SAM_FAMILY_TYPES)
def family_model(request, tmp_path_factory):
    return request.param, make_tiny_sam_family(tmp_path_factory.mktemp(request.param), request.param, seed=5)


@pytest.fixture(scope="module")
def reference(family_model):
    """The model card's path: the family's processor and model classes, loaded from the same directory."""
    import transformers as tf

    from serve_app.models.catalog import family as catalog_family

    details = catalog_family(json.loads((family_model[1] / "config.json").read_text())["model_type"]).details
    processor = getattr(tf, details["processor_class"]).from_pretrained(family_model[1])
    model = getattr(tf, details["model_class"]).from_pretrained(family_model[1]).eval()

    def run(image, **prompts):
        inputs = processor(images=image, return_tensors="pt", **prompts)
        with torch.inference_mode():
            out = model(**inputs, multimask_output="input_points" in prompts and "input_boxes" not in prompts)
        sizes = [inputs["original_sizes"]] + ([inputs["reshaped_input_sizes"]] if "reshaped_input_sizes" in inputs else [])
        logits = processor.post_process_masks(out.pred_masks, *sizes, binarize=False)[0]
        return logits, out.iou_scores[0]
    return run


def assert_masks_match(masks: np.ndarray, logits: torch.Tensor) -> None:
    logits = logits.numpy()
    assert masks.shape == logits.shape
    differ = masks != (logits > 0)
    assert np.all(np.abs(logits[differ]) < LOGIT_TOLERANCE), f"{differ.sum()} pixels differ beyond the tolerance"


def test_boxes_in_one_batch_of_mixed_sizes_match_the_reference(family_model, reference, monkeypatch):
    family, path = family_model
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    segmenter = HfSamSegmenter.load(str(path), device="cpu")
    assert json.loads((path / "config.json").read_text())["model_type"] == family
    images = [pattern(480, 640, seed=1), pattern(300, 200, seed=2), pattern(97, 1203, seed=3)]
    boxes = [np.array([[10, 20, 300, 400], [50, 50, 100, 120], [0, 0, 640, 480]], np.float32),
             np.array([[5.5, 7.25, 150, 280]], np.float32),
             np.array([[100, 10, 900, 90], [1, 1, 2, 2]], np.float32)]
    requests = [SegmentationRequest(image=i, boxes=b, image_key=f"k{n}") for n, (i, b) in enumerate(zip(images, boxes))]
    results = segmenter.segment(requests)
    share = np.mean([found.masks.mean() for found in results])
    assert 0.01 < share < 0.99  # masks with both classes: the comparison below can fail
    for request, found in zip(requests, results):
        logits, scores = reference(request.image, input_boxes=[request.boxes.tolist()])
        assert_masks_match(found.masks, logits[:, 0])
        np.testing.assert_allclose(found.scores, scores[:, 0].numpy(), atol=1e-4)
        assert not found.cache_hit


def test_masks_made_on_the_device_equal_the_host_path(family_model, monkeypatch):
    """A GPU replica's path (the processor on the device where it is torchvision-based, masks up-sampled there,
    RLE from run starts), run here on the CPU: the same masks, scores and RLE bytes as the host path."""
    from serve_app.masks.encode import RLE, encode_masks
    from serve_app.masks.rle import mask_to_rle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    host = HfSamSegmenter.load(str(family_model[1]), device="cpu")
    device = HfSamSegmenter(host.model, host.processor, host.family, host.device, pixels_on_device=True)
    images = [pattern(480, 640, seed=1), pattern(97, 1203, seed=3)]
    boxes = [np.array([[10, 20, 300, 400], [0, 0, 640, 480]], np.float32), np.array([[100, 10, 900, 90]], np.float32)]
    click = dict(points=np.array([[120.0, 50.0]], np.float32), point_labels=np.array([1]))
    requests = [SegmentationRequest(image=i, boxes=b) for i, b in zip(images, boxes)] + \
        [SegmentationRequest(image=images[0], boxes=np.zeros((0, 4), np.float32), **click)]
    expected = host.segment(requests)
    pixels = device.segment(requests)
    runs = device.segment([SegmentationRequest(image=r.image, boxes=r.boxes, points=r.points,
                                               point_labels=r.point_labels, encodings=(RLE,)) for r in requests])
    for want, got, as_runs in zip(expected, pixels, runs):
        assert np.array_equal(got.masks, want.masks)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        assert as_runs.runs is not None and as_runs.masks.shape == (len(want.masks), 0, 0)
        assert [r.tolist() for r in encode_masks(as_runs, (RLE,)).rle] == [mask_to_rle(m).tolist() for m in want.masks]


def test_clicks_and_a_box_with_clicks_match_the_reference(family_model, reference):
    segmenter = HfSamSegmenter.load(str(family_model[1]), device="cpu", cache_bytes=1 << 30)
    image = pattern(360, 500, seed=7)
    click = SegmentationRequest(image=image, boxes=np.zeros((0, 4), np.float32), image_key="img",
                                points=np.array([[120.0, 200.0]], np.float32), point_labels=np.array([1]))
    [found] = segmenter.segment([click])
    logits, scores = reference(image, input_points=[[[[120.0, 200.0]]]], input_labels=[[[1]]])
    best = int(scores[0].argmax())  # a lone click: the best of three candidates
    assert_masks_match(found.masks, logits[0, best:best + 1])
    assert found.scores[0] == pytest.approx(float(scores[0, best]), abs=1e-4)

    refine = SegmentationRequest(image=image, boxes=np.array([[50, 60, 300, 330]], np.float32), image_key="img",
                                 points=np.array([[120.0, 200.0], [250.0, 90.0]], np.float32),
                                 point_labels=np.array([1, 0]))
    [found] = segmenter.segment([refine])
    logits, scores = reference(image, input_points=[[[[120.0, 200.0], [250.0, 90.0]]]], input_labels=[[[1, 0]]],
                               input_boxes=[[[50, 60, 300, 330]]])
    assert_masks_match(found.masks, logits[0, :1])
    assert found.cache_hit and segmenter.images_encoded == 1  # the second request did not re-encode


def test_the_cache_counts_each_entrys_own_bytes(family_model):
    segmenter = HfSamSegmenter.load(str(family_model[1]), device="cpu", cache_bytes=1 << 30)
    requests = [SegmentationRequest(image=pattern(200, 300, seed=s), boxes=np.array([[1, 1, 50, 50]], np.float32),
                                    image_key=f"k{s}") for s in range(3)]
    segmenter.segment(requests)  # one encoder batch of three
    entries = [segmenter.cache.get(f"k{s}") for s in range(3)]
    tensors = [t for e in entries for t in _tensors(e.embedding)]
    assert tensors and all(t.shape[0] == 1 for t in tensors)
    # each cached tensor owns its storage: no entry keeps the whole batch alive behind its counted bytes
    assert all(t.untyped_storage().nbytes() == t.element_size() * t.nelement() for t in tensors)
    assert segmenter.cache.stats()["bytes"] == sum(e.nbytes for e in entries) > 0


def test_a_checkpoint_that_is_not_a_segmenter_is_refused_by_name(tmp_path):
    make_tiny_grounding_dino(tmp_path / "dino")
    with pytest.raises(ModelLoadError, match=r"SEGMENTER_MODEL=.*'grounding-dino' checkpoint.*SAM 2"):
        HfSamSegmenter.load(str(tmp_path / "dino"), device="cpu")
    with pytest.raises(ModelLoadError, match=r"SEGMENTER_MODEL=.*does not exist"):
        HfSamSegmenter.load(str(tmp_path / "missing"), device="cpu")


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_sam_family(tmp_path / "sam2", "sam2")
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("mask_decoder.")}, path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks \d+ of Sam2Model's weights"):
        HfSamSegmenter.load(str(path), device="cpu")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
