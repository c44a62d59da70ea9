"""The other model families through the real service over HTTP: an OWLv2 detector and a transformers SAM 2.1
segmenter (saved as the hub saves it, `sam2_video`) answer Label Studio's captured bodies with valid results,
and a click after a text prompt on the same image reuses the image's embedding."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from serve_app.models.tiny import make_tiny_sam_family
from serve_app.models.tiny_clip import make_tiny_owlv2
from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve

SIZES = {"fam-a.png": (320, 240), "fam-b.png": (200, 300)}  # width, height


@pytest.fixture(scope="module")
def images(image_dir):
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        (image_dir / name).write_bytes(png_bytes(pattern(height, width, seed=40 + seed)))
    return image_dir


@pytest.fixture(scope="module")
def service(tiny_models, images, tmp_path_factory):
    sam2 = make_tiny_sam_family(tmp_path_factory.mktemp("sam2.1-tiny"), "sam2_video", seed=2)
    owlv2 = make_tiny_owlv2(tmp_path_factory.mktemp("owlv2-tiny"), seed=2)
    env = {"DETECTOR_MODEL": str(owlv2), "SEGMENTER_MODEL": str(sam2),
           "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


def post(service, body) -> dict:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_retrieve_predictions_gives_valid_boxes_and_masks(service, image_server):
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=200 + i, data={"image": f"{image_server}/{name}"})
                     for i, name in enumerate(SIZES)]
    payload = post(service, body)
    assert payload["model_version"] == "grounded-serve:owlv2-tiny0+sam2.1-tiny0"  # the models' directories name it
    interface = LabelInterface(body["label_config"])
    for prediction, (width, height) in zip(payload["results"], SIZES.values()):
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(rects) == len(brushes) == 5
        assert interface.validate_prediction({"result": prediction["result"]})
        for rect, brush in zip(rects, brushes):
            assert rect["value"]["rectanglelabels"][0] in {"cats", "house"}  # labels from the config
            assert brush["value"]["brushlabels"] == rect["value"]["rectanglelabels"]
            v = rect["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
            assert (brush["original_width"], brush["original_height"]) == (width, height)
            mask = decode_rle(brush["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
            assert set(np.unique(mask).tolist()) <= {0, 255}


def test_a_click_after_a_text_prompt_on_the_same_image_reuses_its_embedding(service, image_server):
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = f"{image_server}/fam-b.png"
    body["params"]["context"]["result"][0]["value"]["text"] = ["house"]
    before = service.settled_metrics()["sam_embedding_cache"]
    text = post(service, body)["results"][0]
    assert {r["value"]["brushlabels"][0] for r in text["result"] if r["type"] == "brushlabels"} == {"house"}
    encoded = service.metrics(until=lambda m: m["sam_embedding_cache"]["misses"] > before["misses"])
    encoded = encoded["sam_embedding_cache"]
    body["params"]["context"]["result"] = [{
        "type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": True,
        "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["cats"]}}]
    body["label_config"] = CLICK_CONFIG
    click = post(service, body)["results"][0]
    [brush] = [r for r in click["result"] if r["type"] == "brushlabels"]
    assert decode_rle(brush["value"]["rle"]).size == 200 * 300 * 4
    after = service.metrics(until=lambda m: m["sam_embedding_cache"]["hits"] > encoded["hits"])
    after = after["sam_embedding_cache"]
    assert after["hits"] == encoded["hits"] + 1 and after["misses"] == encoded["misses"]
    [(replica, stats)] = after["replicas"].items()
    assert stats["images_encoded"] == encoded["replicas"][replica]["images_encoded"]  # the encoder did not run
