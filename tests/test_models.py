"""Model code without Ray: tiny random-weight models saved, then loaded back through the production loaders."""

import warnings

import numpy as np
import pytest
import torch

from serve_app.models.errors import CheckpointError
from serve_app.models.grounding_dino import GroundingDinoDetector, build_caption
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.models.sam_loading import load_sam
from serve_app.models.segmenter import SamSegmenter
from tests.imaging import pattern


@pytest.fixture(scope="module")
def detector(tiny_models):
    return GroundingDinoDetector.load(str(tiny_models["grounding_dino"]), device="cpu")


@pytest.fixture(scope="module")
def segmenter(tiny_models):
    return SamSegmenter.load(str(tiny_models["sam"]), device="cpu")


def test_detector_loads_the_saved_weights(detector, tiny_models):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_models["grounding_dino"] / "model.safetensors"))
    loaded = detector.model.state_dict()
    key = next(k for k in saved if k.endswith("bbox_embed.0.layers.0.weight"))
    assert torch.equal(saved[key], loaded[key])
    assert type(detector.model).__name__ == "GroundingDinoForObjectDetection"
    assert detector.tokenizer.convert_tokens_to_ids([".", "[CLS]", "[SEP]"]) == [1012, 101, 102]


def test_caption_spans():
    caption, spans = build_caption(["Brown cat", "house"])
    assert caption == "brown cat. house."
    assert [caption[a:b] for a, b in spans] == ["brown cat", "house"]


def test_detections_are_in_image_pixels_with_valid_phrases(detector):
    image = pattern(300, 200, seed=1)
    result = detector.detect([DetectionRequest(image, ["brown cat", "house"], 0.0, 0.0, max_detections=12)])[0]
    assert len(result) == 12
    assert set(result.phrase_ids.tolist()) <= {0, 1}
    x0, y0, x1, y1 = result.boxes.T
    assert (x0 >= 0).all() and (x1 <= 200).all() and (y0 >= 0).all() and (y1 <= 300).all()
    assert (x1 >= x0).all() and (y1 >= y0).all()
    assert np.all(np.diff(result.scores) <= 0)  # best first


def test_each_item_keeps_its_own_thresholds(detector):
    image = pattern(240, 320, seed=2)
    loose, strict = detector.detect([
        DetectionRequest(image, ["a cat"], 0.0, 0.0),
        DetectionRequest(image, ["a cat"], 1.0, 0.0),
    ])
    assert len(loose) > 0 and len(strict) == 0
    assert detector.detect([DetectionRequest(image, [], 0.0, 0.0)])[0].boxes.shape == (0, 4)


def test_pixels_from_a_tensor_equal_pixels_from_pil(detector):
    """The detector hands the image processor a tensor (which it can resize on a GPU): the same pixels as PIL's."""
    from PIL import Image

    assert detector.preprocess_on is None  # a CPU replica resizes where it runs
    image = pattern(300, 200, seed=5)
    ours = detector._pixels(image)
    theirs = detector.image_processor(images=[Image.fromarray(image)], return_tensors="pt")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    frozen = image.copy()
    frozen.setflags(write=False)  # as images arrive from Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about tensors over read-only memory
        assert torch.equal(detector._pixels(frozen)["pixel_values"], ours["pixel_values"])


def test_detect_on_several_threads_at_once_equals_one_at_a_time(detector):
    """The Detector's CPU lanes call detect() from several threads: results must not depend on it."""
    from concurrent.futures import ThreadPoolExecutor

    assert GroundingDinoDetector.concurrent_batches
    requests = [DetectionRequest(pattern(240, 320, seed=s), [f"thing {s}", "a much longer phrase " * s], 0.0, 0.0, 8)
                for s in range(1, 7)]
    alone = [detector.detect([request])[0] for request in requests]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda request: detector.detect([request])[0], requests * 3))
    for expected, got in zip(alone * 3, together):
        assert np.array_equal(expected.phrase_ids, got.phrase_ids)
        np.testing.assert_allclose(expected.boxes, got.boxes, atol=1e-4)


def test_batching_does_not_change_any_item(detector):
    """Different prompts (text padding) and image sizes: each item equals its own single-item run."""
    requests = [
        DetectionRequest(pattern(240, 320, seed=1), ["brown cat", "house"], 0.0, 0.0, 10),
        DetectionRequest(pattern(240, 320, seed=2), ["a dog"], 0.0, 0.0, 10),
        DetectionRequest(pattern(400, 300, seed=3), ["the car", "tree", "a person"], 0.0, 0.0, 10),
        DetectionRequest(pattern(64, 64, seed=4), [], 0.0, 0.0, 10),
    ]
    batched = detector.detect(requests)
    for request, together in zip(requests, batched):
        alone = detector.detect([request])[0]
        assert np.array_equal(alone.phrase_ids, together.phrase_ids)
        np.testing.assert_allclose(alone.boxes, together.boxes, atol=1e-4)
        np.testing.assert_allclose(alone.scores, together.scores, atol=1e-5)


def test_sam_type_is_inferred_and_mismatches_are_clear(tiny_models, tmp_path):
    sam, model_type = load_sam(tiny_models["sam"])
    assert model_type == "tiny" and not sam.training
    with pytest.raises(CheckpointError, match="SAM_MODEL_TYPE is 'vit_b' but .* looks like a 'tiny'"):
        load_sam(tiny_models["sam"], "vit_b")
    state = torch.load(tiny_models["sam"], weights_only=True)
    state.pop("mask_decoder.iou_token.weight")
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"missing keys \['mask_decoder.iou_token.weight'\].*extra.weight"):
        load_sam(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_sam(tmp_path / "nope.pth")


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_sam_layouts_load_strictly(model_type):
    """Each official checkpoint layout (shared fixtures: keys, shapes, order) infers its own type and loads
    strictly into the architecture built for it. Built on the meta device: no memory, no forward pass."""
    import json

    from serve_app.models.sam_builders import build_sam
    from serve_app.models.sam_loading import infer_model_type
    from tests.conftest import SHARED

    layout = json.loads((SHARED / "fixtures" / "segment_anything" / f"{model_type}_state_dict_shapes.json").read_text())
    state = {key: torch.empty(shape, device="meta") for key, shape, *_ in layout["entries"]}
    assert infer_model_type(state) == model_type
    with torch.device("meta"):
        sam = build_sam(model_type)
    assert [(k, list(v.shape)) for k, v in sam.state_dict().items()] == \
        [(key, shape) for key, shape, *_ in layout["entries"]]
    sam.load_state_dict(state, strict=True, assign=True)
    assert sum(p.numel() for p in sam.parameters()) == layout["total_parameters"]


def test_batched_masks_equal_sam_predictor(segmenter):
    """Images of different sizes in one encoder pass give SamPredictor's masks, one image at a time."""
    from tests.loopback import assert_matches_sam_predictor

    images = [pattern(240, 320, seed=1), pattern(320, 180, seed=2), pattern(12, 20, seed=3)]
    boxes = [np.array([[10, 20, 200, 180], [0, 0, 320, 240]], np.float32),
             np.array([[30, 40, 150, 300]], np.float32),
             np.array([[1, 1, 15, 10]], np.float32)]
    results = segmenter.segment([SegmentationRequest(i, b) for i, b in zip(images, boxes)])
    assert_matches_sam_predictor(segmenter.sam, images, boxes, results)


def test_no_boxes_means_no_encoder_work(segmenter):
    result = segmenter.segment([SegmentationRequest(pattern(30, 40), np.zeros((0, 4), np.float32))])[0]
    assert result.masks.shape == (0, 30, 40)


def test_bf16_runs_on_a_cpu_with_bf16_instructions_and_fp32_elsewhere(tiny_models):
    """PRECISION=bf16 on CPU autocasts only where the CPU has AMX or AVX-512 BF16 (detected from its flags)."""
    from serve_app.models.device import cpu_bf16_instructions

    fp32 = SamSegmenter.load(str(tiny_models["sam"]), device="cpu")
    bf16 = SamSegmenter.load(str(tiny_models["sam"]), device="cpu", precision="bf16")
    fp16 = SamSegmenter.load(str(tiny_models["sam"]), device="cpu", precision="fp16")
    images = [pattern(240, 320, seed=4)]
    reference = fp32.embed(images)[0]
    error = float(torch.linalg.vector_norm(bf16.embed(images)[0] - reference) / torch.linalg.vector_norm(reference))
    assert fp16.precision == "fp32" and torch.equal(fp16.embed(images)[0], reference)  # fp16 is CUDA-only
    if cpu_bf16_instructions():
        assert bf16.precision == "bf16" and 1e-6 < error < 5e-2  # really reduced, and close
    else:
        assert bf16.precision == "fp32" and error == 0.0


def test_bf16_detections_stay_close_to_fp32(tiny_models, detector):
    from serve_app.models.device import cpu_bf16_instructions

    if not cpu_bf16_instructions():
        pytest.skip("this CPU has no bf16 matrix instructions: bf16 falls back to fp32")
    bf16 = GroundingDinoDetector.load(str(tiny_models["grounding_dino"]), device="cpu", precision="bf16")
    request = DetectionRequest(image=pattern(240, 320, seed=5), phrases=["cats", "house"], box_threshold=0.0,
                               text_threshold=0.0, max_detections=10)
    [reference], [reduced] = detector.detect([request]), bf16.detect([request])
    assert len(reduced.boxes) == len(reference.boxes) == 10
    assert np.abs(np.sort(reduced.scores) - np.sort(reference.scores)).max() < 0.1
