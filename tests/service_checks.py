"""Checks that several service tests make the same way, whatever models the service runs."""

from __future__ import annotations

import copy

import httpx
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture


def post(service, body) -> dict:
    response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def retrieve_is_valid(service, urls_and_sizes: list[tuple[str, tuple[int, int]]], regions_per_task: int,
                      first_task_id: int = 200) -> dict:
    """Label Studio's captured "Retrieve predictions" body over these images: per task `regions_per_task` boxes,
    each with its brush mask, labels from the config, boxes inside the image, masks that decode to its size."""
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=first_task_id + i, data={"image": url})
                     for i, (url, _) in enumerate(urls_and_sizes)]
    payload = post(service, body)
    interface = LabelInterface(body["label_config"])
    for prediction, (_, (width, height)) in zip(payload["results"], urls_and_sizes):
        rects = [r for r in prediction["result"] if r["type"] == "rectanglelabels"]
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        assert len(rects) == len(brushes) == regions_per_task
        assert interface.validate_prediction({"result": prediction["result"]})
        for rect, brush in zip(rects, brushes):
            assert rect["value"]["rectanglelabels"][0] in {"cats", "house"}  # labels from the config
            assert brush["value"]["brushlabels"] == rect["value"]["rectanglelabels"]
            v = rect["value"]
            assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100 + 1e-6 and v["y"] + v["height"] <= 100 + 1e-6
            assert (brush["original_width"], brush["original_height"]) == (width, height)
            mask = decode_rle(brush["value"]["rle"]).reshape(height, width, 4)[:, :, 3]
            assert set(np.unique(mask).tolist()) <= {0, 255}
    return payload


def click_after_text_is_a_cache_hit(service, image_url: str, size: tuple[int, int]) -> None:
    """A text prompt on an image, then a click on it: the click is answered from the embedding cached for the
    prompt (one hit, no miss, the encoder did not run again)."""
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image_url
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
    assert decode_rle(brush["value"]["rle"]).size == size[0] * size[1] * 4
    after = service.metrics(until=lambda m: m["sam_embedding_cache"]["hits"] > encoded["hits"])
    after = after["sam_embedding_cache"]
    assert after["hits"] == encoded["hits"] + 1 and after["misses"] == encoded["misses"]
    # the replica that answered the click (a detector that caches features, OWLv2 or SAM 3, reports too)
    [(replica, stats)] = [(replica, stats) for replica, stats in after["replicas"].items()
                          if stats.get("hits", 0) > encoded["replicas"].get(replica, {}).get("hits", 0)]
    assert stats["images_encoded"] == encoded["replicas"][replica]["images_encoded"]  # the encoder did not run
