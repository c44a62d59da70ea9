"""OWLv2 and OmDet-Turbo, built tiny with random weights, loaded through serve_app.models.loading.load as DETECTOR_MODEL is, and
checked against each family's own reference path (its processor -> model -> post_process_grounded_object_detection,
one image at a time, as its model card shows)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.models.catalog import DETECTOR
from serve_app.models.loading import load
from serve_app.models.spec import ModelSpec
from serve_app.models.errors import ModelLoadError
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest
from serve_app.models.query_detectors import OMDET_NMS_THRESHOLD, QueryDetector
from serve_app.tiny_models.owlv2_omdet import make_tiny_clip_tokenizer, make_tiny_omdet_turbo, make_tiny_owlv2
from tests.imaging import pattern

BUILDERS = {"owlv2": make_tiny_owlv2, "omdet-turbo": make_tiny_omdet_turbo}

IMAGES = [pattern(240, 320, seed=1), pattern(300, 200, seed=2), pattern(240, 320, seed=4), pattern(97, 131, seed=5)]
PROMPTS = [["cats", "house"], ["a brown dog"], ["house", "Cats", "tree"], ["tree", "car"]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread; on a shared CPU, waiting for it made them 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request, tmp_path_factory):
    """(model_type, checkpoint directory, the service's detector, the family's own processor and model)"""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        detector = load(ModelSpec(DETECTOR, str(path), device="cpu"))
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(path).eval()
    return request.param, path, detector, processor, model


def requests_for(images, prompts, **settings):
    settings = {"box_threshold": 0.0, "max_detections": 10_000, **settings}
    return [DetectionRequest(image=image, phrases=phrases, **settings) for image, phrases in zip(images, prompts)]


def reference(family_name, processor, model, image: np.ndarray, phrases: list[str]):
    """The family's own detections for one image at threshold 0: (boxes clamped to the image, scores, labels)."""
    height, width = image.shape[:2]
    picture = Image.fromarray(image)
    with torch.inference_mode():
        if family_name == "owlv2":
            inputs = processor(images=picture, text=[phrases], truncation=True, return_tensors="pt")
            [found] = processor.post_process_grounded_object_detection(
                model(**inputs), threshold=0.0, target_sizes=[(height, width)], text_labels=[phrases])
        else:
            inputs = processor(images=picture, text=[phrases], return_tensors="pt")
            outputs = model(**inputs)
            [found] = processor.post_process_grounded_object_detection(
                outputs, text_labels=[phrases], threshold=0.0, nms_threshold=OMDET_NMS_THRESHOLD,
                target_sizes=[(height, width)], max_num_det=outputs.decoder_class_logits[0].numel())
    boxes = np.clip(found["boxes"].numpy(), 0, [width, height, width, height])
    return boxes, found["scores"].numpy(), found["labels"].numpy()


def assert_same(found, other):
    assert found.phrase_ids.tolist() == other.phrase_ids.tolist()
    np.testing.assert_allclose(found.scores, other.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(found.boxes, other.boxes, atol=1e-4, rtol=0)


def test_loads_offline_through_load_detector_and_matches_the_family_reference_path(family):
    name, path, detector, processor, model = family
    assert isinstance(detector, QueryDetector) and detector.family == name
    assert json.loads((path / "config.json").read_text())["model_type"] == name
    assert detector.device.type == "cpu" and detector.precision == "fp32" and detector.model is not None
    requests = requests_for(IMAGES, PROMPTS)  # mixed sizes and prompts, one batch
    suppressed = 0
    for request, found in zip(requests, detector.detect(requests)):
        boxes, scores, labels = reference(name, processor, model, request.image, request.phrases)
        assert len(found) == len(scores) > 0  # every candidate kept at threshold 0
        if name == "omdet-turbo":
            suppressed += model.config.num_queries * len(request.phrases) - len(found)
        assert found.boxes.dtype == np.float32 and found.scores.dtype == np.float32
        assert found.phrase_ids.dtype == np.int64
        assert (np.diff(found.scores) <= 0).all()  # best first
        height, width = request.image.shape[:2]
        assert (found.boxes >= 0).all() and (found.boxes[:, 0::2] <= width).all()
        assert (found.boxes[:, 1::2] <= height).all()
        for box, score, label in zip(found.boxes, found.scores, found.phrase_ids):
            same = (labels == label) & (np.abs(scores - score) <= 1e-5) & (np.abs(boxes - box).max(axis=1) <= 1e-4)
            assert same.any(), (box, score, label)  # one of the family's own detections, within 1e-4 px
    if name == "omdet-turbo":
        assert suppressed > 0  # the tiny model's boxes overlap: non-maximum suppression took part


def test_a_tasks_boxes_do_not_depend_on_the_batch(family):
    detector = family[2]
    requests = requests_for(IMAGES, PROMPTS)
    batched = detector.detect(requests)
    for request, found in zip(requests, batched):
        assert_same(found, detector.detect([request])[0])
    # in another company and order, with requests that have no phrases between them
    others = requests_for([pattern(64, 480, seed=9), IMAGES[0]], [["cats", "tree", "car", "house", "dog"], []])
    shuffled = detector.detect([others[0], requests[2], others[1], requests[0]])
    assert len(shuffled[2]) == 0
    assert_same(shuffled[1], batched[2])
    assert_same(shuffled[3], batched[0])


def test_box_threshold_drops_boxes_text_threshold_is_ignored_max_detections_keeps_the_best(family):
    detector = family[2]
    [everything] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1]))
    cut = float(np.median(everything.scores))
    [high] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1], box_threshold=cut))
    assert 0 < len(high) < len(everything) and (high.scores > cut).all()
    kept = everything.scores > cut
    np.testing.assert_allclose(high.boxes, everything.boxes[kept], atol=1e-4, rtol=0)
    [none] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1], box_threshold=1.0))
    assert len(none) == 0 and none.boxes.shape == (0, 4)

    [strict_text] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1], text_threshold=0.99))
    assert_same(strict_text, everything)

    [three] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1], max_detections=3))
    assert len(three) == 3
    np.testing.assert_allclose(three.scores, everything.scores[:3], atol=1e-6, rtol=0)
    [zero] = detector.detect(requests_for(IMAGES[:1], PROMPTS[:1], max_detections=0))
    assert len(zero) == 0


def test_unicode_emoji_and_very_long_phrases_are_read_truncated(family):
    detector = family[2]
    phrases = ["café ☕", "🐱👍", "ein Straßenschild " * 60, "", "   "]
    requests = requests_for(IMAGES[:2], [phrases, ["x" * 5000]]) + requests_for(IMAGES[2:3], [[]])
    found = detector.detect(requests)
    assert set(found[0].phrase_ids.tolist()) <= set(range(len(phrases))) and len(found[0]) > 0
    assert set(found[1].phrase_ids.tolist()) <= {0}
    assert len(found[2]) == 0
    assert np.isfinite(found[0].boxes).all() and np.isfinite(found[0].scores).all()


def test_tiny_checkpoints_are_deterministic_and_small(tmp_path):
    for name, build in BUILDERS.items():
        first, second = build(tmp_path / f"{name}-1", seed=1), build(tmp_path / f"{name}-2", seed=1)
        files = sorted(p.name for p in first.iterdir())
        assert files == sorted(p.name for p in second.iterdir())
        assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
        assert sum((first / f).stat().st_size for f in files) < 1_000_000
    tokenizer = make_tiny_clip_tokenizer(model_max_length=32)
    ids = tokenizer(["a cat", "x" * 500], padding="max_length", truncation=True)["input_ids"]
    assert [len(row) for row in ids] == [32, 32]
    assert all(int(np.argmax(row)) == row.index(tokenizer.eos_token_id) for row in ids)  # pooling finds EOS


def test_a_checkpoint_with_missing_weights_is_refused(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    path = make_tiny_owlv2(tmp_path / "owlv2")
    weights = load_file(path / "model.safetensors")
    dropped = next(key for key in weights if "box_head" in key)
    save_file({key: value for key, value in weights.items() if key != dropped}, path / "model.safetensors",
              metadata={"format": "pt"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"DETECTOR_MODEL=.*no weights for 1 of the OWLv2 model's parameters"):
        load(ModelSpec(DETECTOR, str(path), device="cpu"))


def test_families_nobody_serves_and_the_wrong_class_are_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "yolos"}))
    with pytest.raises(ModelLoadError, match=r"DETECTOR_MODEL=.*'yolos' checkpoint.*serves Grounding DINO "
                                             r"\(grounding-dino\).*OWLv2 \(owlv2\), OmDet-Turbo \(omdet-turbo\)"):
        load(ModelSpec(DETECTOR, str(tmp_path), device="cpu"))
    with pytest.raises(ModelLoadError, match=r"DETECTOR_MODEL=.*does not exist"):
        load(ModelSpec(DETECTOR, str(tmp_path / "nowhere"), device="cpu"))
    owlv2 = make_tiny_owlv2(tmp_path / "owlv2")
    with pytest.raises(ModelLoadError, match=r"OWLv2 \(owlv2\) checkpoint.*serve_app.models.loading.load"):
        GroundingDinoDetector.load(str(owlv2), device="cpu")


def test_owlv2_exemplar_search_matches_image_guided_detection(family):
    """One positive exemplar: the crop is the query image of transformers' image_guided_detection, and the
    detections its post-processing shows (scores above a tenth of the best, after its NMS) are ours, box for box,
    with sigmoid(logit) as the score. Negatives and text join the same queries; OmDet-Turbo refuses exemplars."""
    from serve_app.models.messages import PromptUnsupported

    name, _, detector, processor, model = family
    image = IMAGES[0]
    exemplar = np.array([[40, 30, 150, 140]], np.float32)
    request = DetectionRequest(image=image, phrases=[""], box_threshold=0.0, max_detections=10_000,
                               exemplar_boxes=exemplar, exemplar_labels=np.array([1]), exemplar_phrases=np.array([0]))
    if name != "owlv2":
        with pytest.raises(PromptUnsupported):
            detector.detect([request])
        return
    [found] = detector.detect([request])
    side = max(image.shape[:2])
    with torch.inference_mode():
        inputs = processor(images=Image.fromarray(image), query_images=Image.fromarray(image[30:140, 40:150]),
                           return_tensors="pt")
        outputs = model.image_guided_detection(**inputs)
        scores = outputs.logits[0].max(dim=-1).values.sigmoid()
        [shown] = processor.post_process_image_guided_detection(outputs, threshold=0.0, nms_threshold=0.3,
                                                                target_sizes=torch.tensor([[side, side]]))
    height, width = image.shape[:2]
    expected = np.clip(shown["boxes"].numpy(), 0, [width, height, width, height])
    mine = found.boxes[found.scores > 0.1 * found.scores.max() + 1e-6]
    assert len(mine) == len(expected) > 0
    for box in mine:
        assert np.abs(expected - box).max(axis=1).min() < 1e-4
    assert found.scores[0] == pytest.approx(float(scores.max()), abs=1e-5)

    # a negative exemplar on the same crop beats its positive nowhere, ties everywhere: nothing is left
    negated = DetectionRequest(image=image, phrases=[""], box_threshold=0.0, max_detections=10_000,
                               exemplar_boxes=np.concatenate([exemplar, exemplar]), exemplar_labels=np.array([1, 0]),
                               exemplar_phrases=np.array([0, 0]))
    assert len(detector.detect([negated])[0]) == len(found)  # equal logits: not "better than the positives"
    other = DetectionRequest(image=image, phrases=["", "house"], box_threshold=0.0, max_detections=10_000,
                             exemplar_boxes=exemplar, exemplar_labels=np.array([1]), exemplar_phrases=np.array([0]))
    both = detector.detect([other])[0]
    assert set(both.phrase_ids.tolist()) <= {0, 1} and len(both) > 0


def test_owlv2_exemplars_after_a_text_prompt_reuse_the_images_features(tmp_path):
    """The text prompt's forward leaves the image's feature map in the cache; the exemplar prompt that follows on
    the same image (same image_key) runs no vision encoder, and finds what an uncached search finds."""
    path = make_tiny_owlv2(tmp_path / "owlv2", seed=3)
    cached = load(ModelSpec(DETECTOR, str(path), device="cpu", cache_bytes=1 << 30))
    uncached = load(ModelSpec(DETECTOR, str(path), device="cpu"))
    image = IMAGES[0]
    exemplars = {"exemplar_boxes": np.array([[40, 30, 150, 140], [200, 100, 300, 200]], np.float32),
                 "exemplar_labels": np.array([1, 0]), "exemplar_phrases": np.array([0, 0])}
    cached.detect([DetectionRequest(image=image, phrases=["cats"], box_threshold=0.0, image_key="k")])
    assert cached.images_encoded == 1
    [hit] = cached.detect([DetectionRequest(image=image, phrases=["cats"], box_threshold=0.0, max_detections=10_000,
                                            image_key="k", **exemplars)])
    assert cached.images_encoded == 1 and cached.cache.stats()["hits"] == 1
    [fresh] = uncached.detect([DetectionRequest(image=image, phrases=["cats"], box_threshold=0.0,
                                                max_detections=10_000, image_key="k", **exemplars)])
    assert uncached.images_encoded == 1
    assert_same(hit, fresh)
