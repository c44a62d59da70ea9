"""The labelling pipeline without Ray or HTTP: the class the ingress runs, with the tiny models called in-process
on real image files served over loopback, fed the bodies a real Label Studio sent."""

from __future__ import annotations

import asyncio
import copy

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle

from benchmarks.pipeline import InProcessPipeline, load_models
from serve_app.ingress.errors import BadRequest, ServiceUnavailable
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.settings import Settings
from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture


@pytest.fixture(scope="module")
def settings(tiny_models):
    return Settings.load(env={"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
                              "SAM_CHECKPOINT": str(tiny_models["sam"]), "DEVICE": "cpu"})


@pytest.fixture(scope="module")
def models(settings):
    return load_models(settings)


def batch_body(urls: list[str]) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [{**copy.deepcopy(template), "id": 10 + i, "data": {"image": url}} for i, url in enumerate(urls)]
    return body


def pipeline_for(settings, models, **overrides) -> LabellingPipeline:
    detector, segmenter = models
    policy = ImageSourcePolicy(max_bytes=settings.max_download_bytes, timeout_s=5, max_pixels=10**8,
                               host_allowlist=frozenset({"127.0.0.1"}))
    arguments = dict(settings=settings, model_version="v-test", detect=in_thread(detector.detect),
                     segment=in_thread(segmenter.segment), fetcher=ImageFetcher(policy))
    return LabellingPipeline(**{**arguments, **overrides})


def test_each_task_equals_the_models_run_directly(settings, models, image_server):
    detector, segmenter = models
    urls = [f"{image_server}/img{i}.png" for i in range(3)]
    stages = []
    pipeline = pipeline_for(settings, models, observe_stage=lambda name, s: stages.append(name))
    response = asyncio.run(pipeline.predict(batch_body(urls)))
    assert response["model_version"] == "v-test" and "task_errors" not in response
    for url, prediction in zip(urls, response["results"]):
        image = decode_image(httpx.get(url).content, 10**8)
        [expected] = detector.detect([DetectionRequest(image.pixels, ["cats", "house"], settings.box_threshold,
                                                       settings.text_threshold, settings.max_detections)])
        [masks] = segmenter.segment([SegmentationRequest(image.pixels, expected.boxes)])
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(rects) == len(brushes) == len(expected) > 0
        for rect, box, score in zip(rects, expected.boxes, expected.scores):
            v = rect["value"]
            assert v["x"] == pytest.approx(100 * box[0] / image.width, abs=1e-4)
            assert v["width"] == pytest.approx(100 * (box[2] - box[0]) / image.width, abs=1e-4)
            assert rect["score"] == pytest.approx(float(score))
        decoded = decode_rle(brushes[0]["value"]["rle"]).reshape(image.height, image.width, 4)[:, :, 3] > 0
        assert np.array_equal(decoded, masks.masks[0])
    assert {"fetch", "decode", "detect", "segment", "results"} <= set(stages)


def test_one_broken_task_fails_alone_and_says_why(settings, models, image_server):
    urls = [f"{image_server}/img0.png", f"{image_server}/missing.png", f"{image_server}/not-an-image.png",
            "ftp://example.invalid/x.png", f"{image_server}/img2.png"]
    body = batch_body(urls)
    body["tasks"].insert(1, {"id": 99, "data": {"text": "no image key"}})
    response = asyncio.run(pipeline_for(settings, models).predict(body))
    # a failed task's entry is an empty list: Label Studio stores nothing for it, so it stays retryable
    assert [r == [] for r in response["results"]] == [False, True, True, True, True, False]
    assert response["results"][0]["result"] and response["results"][5]["result"]
    errors = {e["index"]: e["error"] for e in response["task_errors"]}
    assert sorted(errors) == [1, 2, 3, 4]
    assert "no 'image' key" in errors[1] and "HTTP 404" in errors[2]
    assert "not a decodable image" in errors[3] and "unsupported image URL" in errors[4]


def test_request_level_errors_and_an_unavailable_model(settings, models, image_server):
    pipeline = pipeline_for(settings, models)
    for body, message in [([], "must be a JSON object"), ({"tasks": {}}, "must be a list"),
                          ({"tasks": []}, "is empty"), ({"tasks": [{}], "label_config": 5}, "not a string")]:
        with pytest.raises(BadRequest, match=message):
            asyncio.run(pipeline.predict(body))

    async def overloaded(request):
        raise ServiceUnavailable("busy")

    with pytest.raises(ServiceUnavailable, match="busy"):  # the whole request is a 503, retried later
        asyncio.run(pipeline_for(settings, models, detect=overloaded).predict(
            batch_body([f"{image_server}/img0.png"] * 3)))


def test_clicks_alone_skip_the_detector(settings, models, image_server):
    calls = []
    detector, _ = models

    async def counting_detect(request):
        calls.append(request)
        return detector.detect([request])[0]

    body = batch_body([f"{image_server}/img0.png"])
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"] = {"result": [{"type": "keypointlabels", "from_name": "tag2", "to_name": "image",
                                             "value": {"x": 50.0, "y": 50.0, "keypointlabels": ["cats"]}}]}
    response = asyncio.run(pipeline_for(settings, models, detect=counting_detect).predict(body))
    [prediction] = response["results"]
    assert calls == [] and [r["type"] for r in prediction["result"]] == ["brushlabels"]


def test_masks_made_on_the_device_give_the_same_predictions(settings, models, image_server):
    """A GPU segmenter's path (resize, masks and RLE runs on the device), run here on the CPU: the same body gives
    the same regions and the same RLE bytes, clicks included."""
    from serve_app.models.segmenter import SamSegmenter

    detector, segmenter = models
    on_device = SamSegmenter(segmenter.sam, segmenter.device, pixels_on_device=True)

    def regions(response):  # the RLE is a uint8 array until the response is written as JSON
        return [[{k: np.asarray(r["value"].get(k)).tolist() for k in ("rle", "x", "brushlabels", "rectanglelabels")}
                 | {"score": r["score"]} for r in prediction["result"]] for prediction in response["results"]]

    body = batch_body([f"{image_server}/img{i}.png" for i in range(3)])
    host = asyncio.run(pipeline_for(settings, models).predict(body))
    device = asyncio.run(pipeline_for(settings, (detector, on_device)).predict(body))
    assert any(r["type"] == "brushlabels" for prediction in device["results"] for r in prediction["result"])
    assert regions(device) == regions(host)
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"] = {"result": [{"type": "keypointlabels", "from_name": "tag2", "to_name": "image",
                                             "value": {"x": 40.0, "y": 60.0, "keypointlabels": ["cats"]}}]}
    clicked = [asyncio.run(pipeline_for(settings, pair).predict(body)) for pair in (models, (detector, on_device))]
    assert regions(clicked[0]) == regions(clicked[1]) and clicked[0]["results"][0]["result"]


def test_the_benchmarks_in_process_reference_is_this_pipeline(settings, image_server):
    reference = InProcessPipeline.load(settings)
    try:
        response = reference.predict(batch_body([f"{image_server}/img1.png", f"{image_server}/img3.png"]))
    finally:
        reference.close()
    assert isinstance(reference.pipeline, LabellingPipeline) and reference.pipeline.settings.task_concurrency == 1
    assert all(prediction["result"] for prediction in response["results"])
    assert len(reference.stage_s["detect"]) == 2
