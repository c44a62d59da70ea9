"""Interactive segmentation through the real service with MobileSAM (the shared fixture's synthetic
weights): clicks and drawn boxes give SamPredictor's mask, the second prompt on an image hits the
embedding cache, and PolygonLabels configs get polygons."""

from __future__ import annotations

import copy

import httpx
import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle

from serve_app.ingress.images import decode_image
from serve_app.masks.polygons import mask_to_polygons
from serve_app.models.sam_loading import load_sam
from tests.configs import CLICK_CONFIG, POLYGON_CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import jpeg_with_orientation, pattern, png_bytes
from tests.mobile_sam_weights import save_mobile_sam_checkpoint
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_mobile_sam_checkpoint(tmp_path_factory.mktemp("mobile_sam") / "mobile_sam.pt")


@pytest.fixture(scope="module")
def images(image_dir):
    (image_dir / "click-a.png").write_bytes(png_bytes(pattern(240, 320, seed=21)))
    (image_dir / "click-b.png").write_bytes(png_bytes(pattern(300, 200, seed=22)))
    (image_dir / "click-rotated.jpg").write_bytes(jpeg_with_orientation(pattern(120, 160, seed=23), 6))
    return image_dir


@pytest.fixture(scope="module")
def service(tiny_models, checkpoint, images, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_MOBILE_SAM": "true",
           "MOBILESAM_CHECKPOINT": str(checkpoint), "IMAGE_HOST_ALLOWLIST": "127.0.0.1"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def predictor(checkpoint):
    from segment_anything import SamPredictor

    torch.set_num_threads(1)  # the same arithmetic as a replica (Ray gives it one thread)
    sam, _ = load_sam(checkpoint)
    return SamPredictor(sam)


def interactive(image_url: str, regions: list[dict], config: str = CLICK_CONFIG) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image_url
    body["label_config"] = config
    body["params"]["context"] = {"result": regions}
    return body


def keypoint(x, y, positive=True):
    return {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": positive,
            "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": ["cats"]}}


def brush_mask(prediction: dict, width: int, height: int) -> np.ndarray:
    [brush] = [r for r in prediction["result"] if r["type"] == "brushlabels"]
    assert brush["value"]["brushlabels"] == ["cats"]
    return decode_rle(brush["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


def reference(predictor, image, **prompt) -> np.ndarray:
    predictor.set_image(image)
    multimask = prompt.get("box") is None and len(prompt.get("point_coords", [])) == 1
    masks, scores, _ = predictor.predict(multimask_output=multimask, **prompt)
    return masks[int(np.argmax(scores))]


def post(service, body) -> dict:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def load(image_server, name):
    loaded = decode_image(httpx.get(f"{image_server}/{name}").content, 10**8)
    return loaded.pixels, loaded.width, loaded.height


def test_clicks_refine_one_mask_like_sam_predictor(service, image_server, predictor):
    pixels, width, height = load(image_server, "click-a.png")
    clicks = [keypoint(30.0, 40.0), keypoint(60.0, 55.0), keypoint(80.0, 20.0, positive=False)]
    prediction = post(service, interactive(f"{image_server}/click-a.png", clicks))
    assert [r["type"] for r in prediction["result"]] == ["brushlabels"]  # no detector boxes for clicks
    expected = reference(predictor, pixels, point_coords=np.array([[96, 96], [192, 132], [256, 48]], np.float32),
                         point_labels=np.array([1, 1, 0]))
    assert np.array_equal(brush_mask(prediction, width, height), expected)


def test_a_drawn_box_gives_sam_predictors_mask(service, image_server, predictor):
    pixels, width, height = load(image_server, "click-b.png")
    box = {"type": "rectanglelabels", "from_name": "tag3", "to_name": "image",
           "value": {"x": 10.0, "y": 20.0, "width": 50.0, "height": 40.0, "rectanglelabels": ["cats"]}}
    prediction = post(service, interactive(f"{image_server}/click-b.png", [box]))
    expected = reference(predictor, pixels, box=np.array([20, 60, 120, 180], np.float32))
    assert np.array_equal(brush_mask(prediction, width, height), expected)


def test_a_single_click_on_an_exif_rotated_image(service, image_server, predictor):
    pixels, width, height = load(image_server, "click-rotated.jpg")
    assert (width, height) == (120, 160)  # displayed size, which Label Studio's percentages refer to
    prediction = post(service, interactive(f"{image_server}/click-rotated.jpg", [keypoint(25.0, 75.0)]))
    expected = reference(predictor, pixels, point_coords=np.array([[30, 120]], np.float32), point_labels=np.array([1]))
    assert np.array_equal(brush_mask(prediction, width, height), expected)


def test_the_next_click_on_an_image_skips_the_encoder(service, image_server):
    url = f"{image_server}/click-b.png"
    post(service, interactive(url, [keypoint(40.0, 40.0)]))  # the first prompt encodes it (if not cached)
    before = service.settled_metrics()["sam_embedding_cache"]
    post(service, interactive(url, [keypoint(50.0, 50.0)]))
    post(service, interactive(url, [keypoint(50.0, 50.0), keypoint(20.0, 70.0)]))
    after = service.metrics(until=lambda m: m["sam_embedding_cache"]["hits"] - before["hits"] >= 2)
    after = after["sam_embedding_cache"]
    assert after["hits"] - before["hits"] == 2 and after["misses"] == before["misses"]
    [(replica, stats)] = after["replicas"].items()  # this service runs one segmenter replica
    assert stats["images_encoded"] == before["replicas"][replica]["images_encoded"]  # the encoder did not run
    assert stats["entries"] >= 1 and stats["bytes"] == stats["entries"] * 4 * 2**20


def test_text_prompt_with_clicks_and_polygon_output(service, image_server, predictor):
    pixels, _, _ = load(image_server, "click-a.png")
    url = f"{image_server}/click-a.png"
    clicks = [dict(keypoint(40.0, 40.0), from_name="clicks")]
    # clicks alone -> polygons of the clicked mask
    prediction = post(service, interactive(url, clicks, POLYGON_CLICK_CONFIG))
    polygons = [r for r in prediction["result"] if r["type"] == "polygonlabels"]
    assert polygons and all(r["value"]["polygonlabels"] == ["cats"] and r["value"]["closed"] for r in polygons)
    expected = reference(predictor, pixels, point_coords=np.array([[128, 96]], np.float32), point_labels=np.array([1]))
    # the service's polygons are exactly the outline of SamPredictor's mask (synthetic weights make it ragged;
    # tests/test_polygons.py checks the outline itself against shapes)
    assert [r["value"]["points"] for r in polygons] == mask_to_polygons(expected, 1.0)
    # with a text prompt: the detector's best box and the clicks make one mask, labelled by the phrase
    prompt = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["house"]}}
    prediction = post(service, interactive(url, [prompt] + clicks, POLYGON_CLICK_CONFIG))
    assert prediction["result"]
    assert {r["value"]["polygonlabels"][0] for r in prediction["result"]} == {"house"}
