"""With two segmenter replicas, prompts on an image reach the replica that cached its embedding
(serve_app.deployments.routing), so clicks skip the encoder; random routing would miss about half of them.
Prompts arrive concurrently, including several segment calls from one /predict, which is the case
Ray 2.60's default request matching left hanging."""

from __future__ import annotations

import copy
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess, model_deployments
from tests.waiting import wait_until

pytestmark = pytest.mark.serve

IMAGES = [data_url(png_bytes(pattern(120, 160, seed=s))) for s in range(6)]
ROUNDS = 3
MIN_CLICK_HIT_RATIO = 0.75  # docs/interactive.md; measured 1.0 on a quiet 2-core machine


def two_segmenters(config):
    _, segmenter = model_deployments(config)
    segmenter.update(autoscaling_config=None, num_replicas=2)


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
           "SAM_CHECKPOINT": str(tiny_models["sam"]), "BOX_THRESHOLD": "0.0", "TEXT_THRESHOLD": "0.0",
           "CPU_REPLICAS_PER_NODE": "0"}  # both replicas on this one node
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_segmenters)
    # Both replicas must serve before the first prompt: an image hashed while only one was known would
    # move when the second joins (a legitimate miss, but not what this test counts).
    process.start(ready=lambda health: all(health["models_ready"].values())
                  and health["models"].get("segmenter", {}).get("running_replicas") == 2)
    try:  # the ingress's router learns of new replicas by long poll, a moment after the controller
        wait_until(lambda: segmenters_known_to_the_ingress(process) == 2, 60,
                   "the ingress's router learning of both segmenter replicas")
        yield process
    finally:
        process.stop()


def segmenters_known_to_the_ingress(process: ServeProcess) -> int:
    """Segmenter replicas in the ingress's router: Serve logs each change of its set (to the replica's log file only)."""
    logs = Path(process.ray_tmp, "ray", "session_latest", "logs", "serve").glob("replica_grounded-serve_Ingress_*.log")
    counts = re.findall(r"Got updated replicas for Deployment\(name='Segmenter', app='grounded-serve'\): (\d+) total",
                        "".join(log.read_text(errors="replace") for log in logs))
    return int(counts[-1]) if counts else 0


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


def test_clicks_reach_the_replica_holding_the_images_embedding(service):
    with httpx.Client(base_url=service.url, timeout=60) as client:
        response = client.post("/predict", json=all_tasks(IMAGES))
        assert response.status_code == 200, response.text
        assert not response.json().get("task_errors"), response.json()["task_errors"]
        assert all(prediction["result"] for prediction in response.json()["results"])
        after_text = service.metrics(until=lambda m: m["sam_embedding_cache"]["misses"] >= len(IMAGES))
        assert after_text["sam_embedding_cache"]["misses"] == len(IMAGES)
        assert after_text["sam_embedding_cache"]["hits"] == 0

        def post_click(args):
            image, x = args
            with httpx.Client(base_url=service.url, timeout=60) as own:
                return own.post("/predict", json=click(image, x))

        with ThreadPoolExecutor(len(IMAGES)) as pool:
            for round_ in range(ROUNDS):  # every round: one click per image, all at once
                for response in pool.map(post_click, [(image, 20.0 + 10 * round_) for image in IMAGES]):
                    assert response.status_code == 200, response.text
                    assert response.json()["results"][0]["result"]
    lookups = len(IMAGES) * (ROUNDS + 1)
    cache = service.metrics(until=lambda m: m["sam_embedding_cache"]["hits"]
                            + m["sam_embedding_cache"]["misses"] >= lookups)["sam_embedding_cache"]
    assert cache["hits"] + cache["misses"] == lookups
    # Random routing over two replicas would miss about half the clicks. FIFOMixin may hand a replica chosen
    # for one image to an older pending request in a burst (serve_app/deployments/routing.py): a bounded
    # share of misses, each an extra encoder run on the other replica, never a wrong mask.
    click_hits = cache["hits"] / (len(IMAGES) * ROUNDS)
    assert click_hits >= MIN_CLICK_HIT_RATIO, cache
    encoded = {replica: stats.get("images_encoded", 0) for replica, stats in cache["replicas"].items()}
    assert len(encoded) == 2 and sum(encoded.values()) == cache["misses"]  # each miss is one encoder run
    assert min(encoded.values()) >= 1  # both replicas hold a share
