"""With two segmenter replicas, every prompt on an image reaches the replica that cached its embedding
(the image-affinity router), so each image is encoded once; random routing would encode most twice."""

from __future__ import annotations

import copy

import httpx
import pytest

from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve


def two_segmenters(config):
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Segmenter":
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
           "SAM_CHECKPOINT": str(tiny_models["sam"])}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_segmenters).start()
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


def test_each_image_is_encoded_once_across_two_replicas(service):
    images = [data_url(png_bytes(pattern(120, 160, seed=s))) for s in range(6)]
    replicas_seen = set()
    with httpx.Client(base_url=service.url, timeout=60) as client:
        for round_ in range(4):
            for image in images:
                response = client.post("/predict", json=click(image, 20.0 + 10 * round_))
                assert response.status_code == 200 and response.json()["results"][0]["result"]
                replicas_seen.add(client.get("/metrics").json()["sam_embedding_cache"]["replica"]["replica"])
        cache = client.get("/metrics").json()["sam_embedding_cache"]
    assert len(replicas_seen) == 2  # both replicas served images
    assert cache["misses"] == len(images)  # one encoder run per image, on its replica
    assert cache["hits"] == 3 * len(images)
