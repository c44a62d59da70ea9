"""With two segmenter replicas, every prompt on an image reaches the replica that cached its embedding
(serve_app.deployments.routing), so each image is encoded once; random routing would encode most twice.
Prompts arrive concurrently, including several segment calls from one /predict, which is the case
Ray 2.60's base router left hanging."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve

IMAGES = [data_url(png_bytes(pattern(120, 160, seed=s))) for s in range(6)]


def two_segmenters(config):
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Segmenter":
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
           "SAM_CHECKPOINT": str(tiny_models["sam"]), "BOX_THRESHOLD": "0.0", "TEXT_THRESHOLD": "0.0"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_segmenters)
    # Both replicas must serve before the first prompt: an image hashed while only one was known would
    # move when the second joins (a legitimate miss, but not what this test counts).
    process.start(ready=lambda health: all(health["models_ready"].values())
                  and health["models"].get("segmenter", {}).get("running_replicas") == 2)
    time.sleep(2)  # the ingress's router learns of new replicas by long poll, a moment after the controller
    yield process
    process.stop()


def click(image: str, x: float) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"] = {"result": [{"type": "keypointlabels", "from_name": "tag2", "to_name": "image",
                                             "is_positive": True, "value": {"x": x, "y": 50.0,
                                                                            "keypointlabels": ["cats"]}}]}
    return body


def all_tasks(images: list[str]) -> dict:
    """"Retrieve predictions" for every image in one request: one concurrent segment call per task."""
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    template = body["tasks"][0]
    body["tasks"] = [{**copy.deepcopy(template), "id": 200 + i, "data": {"image": url}} for i, url in enumerate(images)]
    return body


def test_each_image_is_encoded_once_across_two_replicas(service):
    with httpx.Client(base_url=service.url, timeout=60) as client:
        response = client.post("/predict", json=all_tasks(IMAGES))
        assert response.status_code == 200, response.text
        assert not response.json().get("task_errors"), response.json()["task_errors"]
        assert all(prediction["result"] for prediction in response.json()["results"])
        after_text = client.get("/metrics").json()["sam_embedding_cache"]
        assert after_text["misses"] == len(IMAGES) and after_text["hits"] == 0

        def post_click(args):
            image, x = args
            with httpx.Client(base_url=service.url, timeout=60) as own:
                return own.post("/predict", json=click(image, x))

        with ThreadPoolExecutor(len(IMAGES)) as pool:
            for round_ in range(3):  # every round: one click per image, all at once
                for response in pool.map(post_click, [(image, 20.0 + 10 * round_) for image in IMAGES]):
                    assert response.status_code == 200, response.text
                    assert response.json()["results"][0]["result"]
        cache = client.get("/metrics").json()["sam_embedding_cache"]
    assert cache["misses"] == len(IMAGES)  # one encoder run per image, on its replica
    assert cache["hits"] == 3 * len(IMAGES)
    encoded = {replica: stats["images_encoded"] for replica, stats in cache["replicas"].items()}
    assert len(encoded) == 2 and sum(encoded.values()) == len(IMAGES)  # both replicas hold a share
    assert min(encoded.values()) >= 1
