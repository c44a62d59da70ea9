"""A model replica lost while another keeps running: the retried calls wait in the running replica's hands, however
long its queue takes, instead of being cut at REPLICA_RETRY_TIMEOUT_S and losing their tasks.

Two Detector replicas that wait up to 4 s to fill a batch, so a request is reliably inside a replica when one is
killed, and a retry waits there longer than REPLICA_RETRY_TIMEOUT_S (1 s here).
"""

from __future__ import annotations

import copy
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.configs import SEED_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess, model_deployments

pytestmark = pytest.mark.serve


def two_slow_detectors(config: dict) -> None:
    [detector] = model_deployments(config, segmenter=False)
    detector.pop("autoscaling_config", None)
    detector["num_replicas"] = 2
    detector["user_config"]["batch_wait_timeout_s"] = 4.0


@pytest.fixture(scope="module")
def service(tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "false",
           "REPLICA_RETRY_TIMEOUT_S": "1", "TASK_TIMEOUT_S": "60",
           "CPU_REPLICAS_PER_NODE": "0"}  # both replicas on this one node
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_slow_detectors).start(
        ready=lambda health: health.get("models", {}).get("detector", {}).get("running_replicas") == 2)
    yield process
    process.stop()


def one_task(seed: int) -> dict:
    body = copy.deepcopy(load_ls_fixture("predict_batch.json")["body"])
    body["tasks"] = [dict(copy.deepcopy(body["tasks"][0]), id=seed,
                          data={"image": data_url(png_bytes(pattern(96, 128, seed=seed)))})]
    body["label_config"] = SEED_CONFIG
    return body


def replica_failures(service: ServeProcess, above: int = -1) -> int:
    """The ingress's count of failed Detector calls, once it is above `above` or 5 s have passed (export lag)."""
    count = lambda metrics: int(metrics["counters"].get("detector_replica_failures", 0))  # noqa: E731
    return count(service.metrics(until=lambda metrics: count(metrics) > above, timeout_s=5))


def test_a_retry_held_by_a_running_replica_is_not_cut(service):
    answers = []
    for round_ in range(3):  # the router may have put every request on the surviving replica: then again
        deadline = time.monotonic() + 60
        while len(service.replica_pids("Detector")) < 2 and time.monotonic() < deadline:
            time.sleep(1)  # Serve's replacement for the replica killed last round
        failures_before = replica_failures(service)
        victim = service.replica_pids("Detector")[0]
        with httpx.Client(base_url=service.url, timeout=60) as client, ThreadPoolExecutor(6) as pool:
            sent = [pool.submit(client.post, "/predict", json=one_task(10 * round_ + i)) for i in range(6)]
            time.sleep(1.5)  # every request is now waiting in a replica's 4 s batch window
            os.kill(victim, signal.SIGKILL)
            answers += [future.result() for future in sent]
        if replica_failures(service, above=failures_before) > failures_before:
            break
    else:
        pytest.fail("no request was ever on the killed replica")
    for answer in answers:
        assert answer.status_code == 200, answer.text  # was a 503 once the retry outlived REPLICA_RETRY_TIMEOUT_S
        [prediction] = answer.json()["results"]
        assert prediction["result"], "a retried task came back empty"
    assert service.wait_for_log(r"retry not answered after 1 s: waiting while Serve reports a running replica")
