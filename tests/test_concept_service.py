"""The concept pipeline through the real service over HTTP: SAM 3 (tiny, random weights, saved as the hub's
facebook/sam3 is, `sam3_video`) as DETECTOR_MODEL gives boxes and masks in one model for Label Studio's captured
bodies, and a click after a text prompt on the same image is answered from the features cached for the prompt."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from serve_app.models.tiny_sam3 import make_tiny_sam3_video
from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve

SIZES = {"concept-a.png": (320, 240), "concept-b.png": (150, 260)}  # width, height


@pytest.fixture(scope="module")
def service(image_dir, tmp_path_factory):
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        (image_dir / name).write_bytes(png_bytes(pattern(height, width, seed=60 + seed)))
    sam3 = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-tiny"), seed=1)
    env = {"DETECTOR_MODEL": str(sam3), "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0",
           "MAX_DETECTIONS": "4"}  # PIPELINE left at auto: SAM 3 means concept
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


def post(service, body) -> dict:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_one_model_gives_boxes_and_masks_for_retrieve_predictions(service, image_server):
    health = httpx.get(f"{service.url}/health", timeout=5).json()
    assert health["models_ready"] == {"detector": True}  # no Segmenter deployment in this pipeline
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=300 + i, data={"image": f"{image_server}/{name}"})
                     for i, name in enumerate(SIZES)]
    payload = post(service, body)
    interface = LabelInterface(body["label_config"])
    for prediction, (width, height) in zip(payload["results"], SIZES.values()):
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(rects) == len(brushes) == 4  # MAX_DETECTIONS across both labels' phrases
        assert interface.validate_prediction({"result": prediction["result"]})
        for rect, brush in zip(rects, brushes):
            assert rect["value"]["rectanglelabels"][0] in {"cats", "house"}
            assert brush["value"]["brushlabels"] == rect["value"]["rectanglelabels"]
            v = rect["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
            mask = decode_rle(brush["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
            assert set(np.unique(mask).tolist()) <= {0, 255}


def test_a_click_after_a_text_prompt_reuses_the_prompts_image_features(service, image_server):
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = f"{image_server}/concept-b.png"
    body["params"]["context"]["result"][0]["value"]["text"] = ["house"]
    before = service.settled_metrics()["sam_embedding_cache"]
    text = post(service, body)["results"][0]
    assert {r["value"]["brushlabels"][0] for r in text["result"] if r["type"] == "brushlabels"} == {"house"}
    encoded = service.metrics(until=lambda m: m["sam_embedding_cache"]["misses"] > before["misses"])
    encoded = encoded["sam_embedding_cache"]
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"]["result"] = [{
        "type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": True,
        "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["cats"]}}]
    click = post(service, body)["results"][0]
    [brush] = [r for r in click["result"] if r["type"] == "brushlabels"]
    assert decode_rle(brush["value"]["rle"]).size == 150 * 260 * 4
    after = service.metrics(until=lambda m: m["sam_embedding_cache"]["hits"] > encoded["hits"])
    after = after["sam_embedding_cache"]
    assert after["hits"] == encoded["hits"] + 1 and after["misses"] == encoded["misses"]
    [(replica, stats)] = after["replicas"].items()
    assert stats["images_encoded"] == encoded["replicas"][replica]["images_encoded"]  # the encoder did not run
