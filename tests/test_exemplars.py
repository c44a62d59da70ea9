"""Exemplar prompts ("find every object like this one", positive and negative, with or without text) through the
labelling pipeline with the tiny SAM 3 in-process: the body as Label Studio's editor sends it (two RectangleLabels,
NOT selected beside the class for a negative), the model's own exemplar search as the reference, and every bad
input a clear 4xx."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.models.messages import DetectionRequest
from serve_app.settings import Settings
from tests.configs import EXEMPLAR_CONFIG, SEED_CONFIG, drawn_box


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    from serve_app.models.sam3_concept import Sam3Concept
    from serve_app.tiny_models.sam3 import make_tiny_sam3_video

    return Sam3Concept.load(str(make_tiny_sam3_video(tmp_path_factory.mktemp("sam3"), seed=5)), device="cpu",
                            cache_bytes=1 << 30)


def pipeline(concept, exemplars=True, **env) -> LabellingPipeline:
    settings = Settings.load(env={"DEVICE": "cpu", "BOX_THRESHOLD": "0.0", "EXEMPLAR_THRESHOLD": "0.0", **env})
    policy = ImageSourcePolicy(max_bytes=10**7, timeout_s=5, max_pixels=10**8, host_allowlist=frozenset({"127.0.0.1"}))
    return LabellingPipeline(settings=settings, model_version="v", detect=in_thread(concept.detect),
                             segment=in_thread(concept.segment), fetcher=ImageFetcher(policy), exemplars=exemplars)


def box(x, y, w, h, *labels, control="exemplar", region_id=None):
    return drawn_box(region_id or f"r{x}{y}{w}{h}{control}", x, y, w, h, list(labels), control=control)


def body(url: str, *results, config=EXEMPLAR_CONFIG) -> dict:
    return {"tasks": [{"id": 7, "data": {"image": url}}], "label_config": config, "project": "3.1700000000",
            "params": {"login": None, "password": None, "context": {"result": list(results)}}}


def prompt(text: str) -> dict:
    return {"value": {"text": [text]}, "id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
            "origin": "manual"}


def test_positive_and_negative_exemplars_find_what_the_model_finds_with_the_exemplars_label(concept, image_server):
    url = f"{image_server}/img0.png"
    image = decode_image(httpx.get(url).content, 10**8)
    answer = asyncio.run(pipeline(concept).predict(body(
        url, box(10, 20, 30, 40, "cats"), box(50, 10, 20, 30, "cats", "NOT"))))
    assert "task_errors" not in answer
    w, h = image.width, image.height
    [expected] = concept.detect([DetectionRequest(
        image=image.pixels, phrases=[""], box_threshold=0.0, max_detections=50,
        exemplar_boxes=np.array([[0.10 * w, 0.20 * h, 0.40 * w, 0.60 * h], [0.50 * w, 0.10 * h, 0.70 * w, 0.40 * h]],
                                np.float32),
        exemplar_labels=np.array([1, 0]), exemplar_phrases=np.array([0, 0]))])
    result = answer["results"][0]["result"]
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    brushes = [r for r in result if r["type"] == "brushlabels"]
    assert len(rects) == len(brushes) == len(expected) > 0
    assert {r["value"]["rectanglelabels"][0] for r in rects} == {"cats"}
    assert all(r["from_name"] == "label" for r in rects)  # never into the exemplar control
    assert rects[0]["value"]["x"] == pytest.approx(100 * expected.boxes[0][0] / w, abs=1e-3)
    assert rects[0]["score"] == pytest.approx(float(expected.scores[0]), abs=1e-5)


def test_text_and_exemplars_of_one_label_are_one_prompt_and_other_labels_keep_their_text(concept, image_server):
    url = f"{image_server}/img1.png"
    answer = asyncio.run(pipeline(concept).predict(body(url, prompt("cats. house"), box(5, 5, 30, 30, "cats"))))
    labels = {r["value"]["rectanglelabels"][0] for r in answer["results"][0]["result"] if r["type"] == "rectanglelabels"}
    assert labels <= {"cats", "house"} and "cats" in labels


def test_each_prompt_has_its_own_threshold(concept, image_server):
    """EXEMPLAR_THRESHOLD (or an `exemplar_threshold` Number in the context) for what the exemplars find; the typed
    phrases keep BOX_THRESHOLD."""
    url = f"{image_server}/img1.png"
    number = {"type": "number", "from_name": "exemplar_threshold", "to_name": "image", "value": {"number": 1.0}}
    answer = asyncio.run(pipeline(concept).predict(body(url, prompt("house"), box(5, 5, 30, 30, "cats"), number)))
    labels = [r["value"]["rectanglelabels"][0] for r in answer["results"][0]["result"] if r["type"] == "rectanglelabels"]
    assert labels and set(labels) == {"house"}  # nothing scores above 1.0: the exemplars of cats find nothing
    strict = pipeline(concept, EXEMPLAR_THRESHOLD="1.0")
    assert strict.parse(body(url, box(5, 5, 30, 30, "cats"))).thresholds.exemplar == 1.0


def test_a_box_drawn_with_the_region_control_still_segments_that_box(concept, image_server):
    url = f"{image_server}/img0.png"
    answer = asyncio.run(pipeline(concept).predict(body(url, box(10, 20, 30, 40, "cats", control="label"))))
    result = answer["results"][0]["result"]
    assert [r["type"] for r in result] == ["brushlabels"]  # one mask for the box, no search


def test_one_box_sent_with_both_controls_is_an_exemplar(concept, image_server):
    url = f"{image_server}/img0.png"
    answer = asyncio.run(pipeline(concept).predict(body(
        url, box(10, 20, 30, 40, "cats", region_id="same"), box(10, 20, 30, 40, "cats", control="label",
                                                                  region_id="same"))))
    assert sum(r["type"] == "rectanglelabels" for r in answer["results"][0]["result"]) > 1


@pytest.mark.parametrize("results, message", [
    ([box(10, 20, 30, 40, "cats", "NOT")], "all negative"),
    ([box(10, 20, 30, 40, "dogs")], "'dogs' is not a label"),
    ([box(10, 20, 0, 40, "cats")], "no area"),
    ([box(100, 20, 30, 40, "cats")], "no area"),
    ([box(10, 20, 30, 40, "NOT"), box(1, 2, 3, 4, "cats"), box(5, 6, 7, 8, "house")], "class label selected beside"),
    ([box(i, 1, 2, 3, "cats") for i in range(40)], "MAX_EXEMPLARS"),
    ([{"type": "rectanglelabels", "from_name": "exemplar", "value": {"x": float("nan"), "y": 1, "width": 2,
                                                                     "height": 3}}], "finite"),
])
def test_bad_exemplars_are_clear_4xx_errors(concept, results, message):
    with pytest.raises(BadRequest, match=message) as info:
        pipeline(concept).parse(body("http://127.0.0.1/x.png", *results))
    assert 400 <= info.value.status_code < 500


def test_a_detector_without_visual_prompts_says_which_settings_enable_them(concept):
    with pytest.raises(BadRequest, match="SAM 3.*DETECTOR_MODEL=facebook/sam3") as info:
        pipeline(concept, exemplars=False).parse(body("http://127.0.0.1/x.png", box(10, 20, 30, 40, "cats")))
    assert info.value.status_code == 400


def test_a_config_without_the_exemplar_control_keeps_todays_boxes(concept, image_server):
    """Without a control named EXEMPLAR_CONTROL, a RectangleLabels box is a region, as before."""
    parsed = pipeline(concept).parse(body("http://127.0.0.1/x.png", box(10, 20, 30, 40, "cats", control="label"),
                                          config=SEED_CONFIG))
    assert not parsed.exemplars
    renamed = pipeline(concept, EXEMPLAR_CONTROL="examples").parse(body(
        "http://127.0.0.1/x.png", box(10, 20, 30, 40, "cats"),
        config=EXEMPLAR_CONFIG.replace('name="exemplar"', 'name="examples"')))
    assert not renamed.exemplars  # the box came from "exemplar", which is no longer the exemplar control
    named = pipeline(concept, EXEMPLAR_CONTROL="examples").parse(body(
        "http://127.0.0.1/x.png", box(10, 20, 30, 40, "cats", control="examples"),
        config=EXEMPLAR_CONFIG.replace('name="exemplar"', 'name="examples"')))
    assert len(named.exemplars) == 1 and named.exemplar_phrases == (0,)


def test_owlv2_finds_boxes_from_an_exemplar_and_the_segmenter_masks_them(tiny_models, image_server, tmp_path):
    """detect+segment with OWLv2: the exemplar search gives the boxes, the configured segmenter one mask each."""
    from serve_app.models.catalog import DETECTOR, SEGMENTER
    from serve_app.models.loading import load
    from serve_app.models.spec import ModelSpec
    from serve_app.tiny_models.owlv2_omdet import make_tiny_owlv2

    owlv2 = load(ModelSpec(DETECTOR, str(make_tiny_owlv2(tmp_path / "owlv2", seed=2)), device="cpu"))
    sam = load(ModelSpec(SEGMENTER, str(tiny_models["sam"]), "SAM_CHECKPOINT", device="cpu"))
    settings = Settings.load(env={"DEVICE": "cpu", "BOX_THRESHOLD": "0.0", "EXEMPLAR_THRESHOLD": "0.0",
                                  "MAX_DETECTIONS": "3"})
    policy = ImageSourcePolicy(max_bytes=10**7, timeout_s=5, max_pixels=10**8, host_allowlist=frozenset({"127.0.0.1"}))
    labelling = LabellingPipeline(settings=settings, model_version="v", detect=in_thread(owlv2.detect),
                                  segment=in_thread(sam.segment), fetcher=ImageFetcher(policy), exemplars=True)
    answer = asyncio.run(labelling.predict(body(f"{image_server}/img0.png", box(10, 20, 30, 40, "house"))))
    result = answer["results"][0]["result"]
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    assert 0 < len(rects) <= 3 and {r["value"]["rectanglelabels"][0] for r in rects} == {"house"}
    assert sum(r["type"] == "brushlabels" for r in result) == len(rects)
