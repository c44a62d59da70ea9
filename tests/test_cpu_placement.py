"""On CPU a model replica already uses every core of its node, so Serve places at most CPU_REPLICAS_PER_NODE
replicas of one model on a node (default 1): a second Detector on a full 2-core node cut the service to 0.78-0.82
of the bare models' throughput (docs/performance.md). The limit is per node, so `0` (no limit) brings the second
replica back on the same node, as the replica-loss and affinity tests need.
"""

from __future__ import annotations

import copy
import time

import httpx
import pytest

from tests.configs import SEED_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess, model_deployments

pytestmark = pytest.mark.serve


def two_detectors(config: dict) -> None:
    [detector] = model_deployments(config, segmenter=False)
    detector.pop("autoscaling_config", None)
    detector["num_replicas"] = 2


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "false",
           "BOX_THRESHOLD": "0.0", "TEXT_THRESHOLD": "0.0", "ACCELERATOR": "cpu"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_detectors).start()
    yield process
    process.stop()


def detector_status(service: ServeProcess) -> dict:
    return httpx.get(f"{service.url}/health", timeout=5).json()["models"]["detector"]


def second_detector_held_for_a_node(families: dict) -> bool:
    """Ray's own view, from its Prometheus export: one Detector replica alive, the other pending creation, and the
    scheduler holding a lease it cannot place for lack of resources (CPUs are free here: the per-node slot), not
    one that merely waits for a worker process to start."""
    def samples(name):
        return families[name].samples if name in families else []

    actors = {s.labels.get("State"): s.value for s in samples("ray_actors")
              if s.labels.get("Source") == "gcs" and s.labels.get("Name") == "ServeReplica:grounded-serve:Detector"}
    unplaced = sum(s.value for s in samples("ray_scheduler_unscheduleable_tasks")
                   if s.labels.get("Reason") in ("WaitingForResources", "WaitingForRemoteResources", "Infeasible"))
    return actors.get("ALIVE") == 1 and actors.get("PENDING_CREATION") == 1 and unplaced >= 1


def test_a_second_cpu_replica_of_a_model_waits_for_another_node(service):
    # Without the limit both replicas are created together at deploy and placed on this node at once.
    assert second_detector_held_for_a_node(service.prometheus(until=second_detector_held_for_a_node, timeout_s=60))
    assert len(service.replica_pids("Detector")) == 1
    status = detector_status(service)
    assert status["running_replicas"] == 1
    assert status["status"] != "HEALTHY"  # Serve still wants the second replica: it is pending, not dropped

    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    body["label_config"] = SEED_CONFIG
    images = [data_url(png_bytes(pattern(96, 128, seed=i))) for i in range(3)]
    template = body["tasks"][0]
    body["tasks"] = [dict(copy.deepcopy(template), id=i, data={"image": image}) for i, image in enumerate(images)]
    answer = httpx.post(f"{service.url}/predict", json=body, timeout=90)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 3 and all(result["result"] for result in results)


def test_no_limit_places_both_replicas_on_the_one_node(service):
    service.update_config(lambda config: config["applications"][0]["args"].update(cpu_replicas_per_node=0))
    deadline = time.monotonic() + 180
    running = 0
    while time.monotonic() < deadline:
        try:
            running = detector_status(service).get("running_replicas", 0)
        except (httpx.HTTPError, ValueError, KeyError):  # the ingress restarts with the new args
            running = 0
        if running == 2:
            break
        time.sleep(1)
    assert running == 2
    assert len(service.replica_pids("Detector")) == 2
