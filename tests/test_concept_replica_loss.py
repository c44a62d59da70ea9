"""A click in the concept pipeline whose Detector replica dies: the retry runs on the other Detector replica and the
click gets its mask, however long that replica takes, instead of a 503.

In the concept pipeline (SAM 3 as DETECTOR_MODEL) the app has no Segmenter deployment: the Detector answers clicks
(its `segment` method). The ingress retries a call whose replica died once, and when the retry is still unanswered
REPLICA_RETRY_TIMEOUT_S later it asks Serve whether the deployment has a running replica; it must ask about the
deployment the click went to (Detector), not the Segmenter the app lacks (issue #30).

Two Detector replicas that wait 6 s to fill a batch hold the click when its replica is killed, and hold its retry
for longer than REPLICA_RETRY_TIMEOUT_S (1 s here).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from label_studio_sdk.converter.brush import decode_rle
from prometheus_client.parser import text_string_to_metric_families

from serve_app.tiny_models.sam3 import make_tiny_sam3_video
from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess, model_deployments
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.timeout(400)]  # the service starts, and up to 3 rounds of kills

BATCH_WAIT_S = 6.0  # how long an idle Detector replica holds a click for a fuller batch, the retry's too
WIDTH, HEIGHT = 160, 120


def two_slow_detectors(config: dict) -> None:
    [detector] = model_deployments(config, segmenter=False)  # concept: no Segmenter deployment
    detector.pop("autoscaling_config", None)
    detector["num_replicas"] = 2
    detector["user_config"]["batch_wait_timeout_s"] = BATCH_WAIT_S


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    sam3 = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-tiny"), seed=1)  # `sam3_video`: has the tracker
    env = {"DETECTOR_MODEL": str(sam3), "PIPELINE": "concept", "REPLICA_RETRY_TIMEOUT_S": "1",
           "TASK_TIMEOUT_S": "60", "CPU_REPLICAS_PER_NODE": "0"}  # both replicas on this one node
    process = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_slow_detectors).start(
        ready=lambda health: health.get("models", {}).get("detector", {}).get("running_replicas") == 2)
    yield process
    process.stop()


def click(seed: int) -> dict:
    """A keypoint click as Label Studio's editor sends it, on an image of its own (a cache miss: the encoder runs)."""
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["id"] = seed
    body["tasks"][0]["data"]["image"] = data_url(png_bytes(pattern(HEIGHT, WIDTH, seed=seed)))
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"] = {"result": [{
        "type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": True,
        "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["cats"]}}]}
    return body


def counters(service: ServeProcess, until=lambda counters: True) -> dict[str, int]:
    """The ingress's counters on /metrics, once `until(counters)` holds or 5 s have passed (export lag)."""
    read = lambda metrics: {name: int(value) for name, value in metrics["counters"].items()}  # noqa: E731
    return read(service.metrics(until=lambda metrics: until(read(metrics)), timeout_s=5))


def replica_failures(counters: dict[str, int]) -> int:
    """Model calls whose replica was lost, whichever deployment the ingress counted them for."""
    return sum(value for name, value in counters.items() if name.endswith("_replica_failures"))


def processing_queries(service: ServeProcess):
    """Serve's `serve_replica_processing_queries` gauge from Ray's Prometheus endpoints (its service-discovery file
    lists them; one may not listen yet, so each is read on its own), or None."""
    discovery = Path(service.ray_tmp) / "ray" / "prom_metrics_service_discovery.json"
    try:
        targets = json.loads(discovery.read_text())[0]["targets"]
    except (OSError, ValueError, LookupError):
        return None
    for target in targets:
        try:
            exported = httpx.get(f"http://{target}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(exported):
            if family.name == "ray_serve_replica_processing_queries":
                return family
    return None


def replica_holding_a_request(service: ServeProcess) -> int | None:
    """The pid of a live Detector replica that Serve reports processing a request, if any: Ray's Prometheus export
    names the replica's worker, and the worker's log file (python-core-worker-<WorkerId>_<pid>.log) its pid."""
    family = processing_queries(service)
    if family is None:
        return None
    logs = Path(service.ray_tmp) / "ray" / "session_latest" / "logs"
    live = set(service.replica_pids("Detector"))  # samples of a replica killed earlier may linger
    for sample in family.samples:
        if sample.labels.get("deployment") != "Detector" or sample.value < 1:
            continue
        for log in logs.glob(f"python-core-worker-{sample.labels['WorkerId']}_*.log"):
            pid = int(log.stem.rsplit("_", 1)[1])
            if pid in live:
                return pid
    return None


def test_a_click_whose_detector_replica_dies_is_answered_by_the_other_one(service):
    for round_ in range(3):  # the click may have left its replica before the kill (a loaded machine): again
        wait_until(lambda: len(service.replica_pids("Detector")) == 2, 90,
                   "Serve's replacement for the replica killed last round")
        before = counters(service)
        with httpx.Client(base_url=service.url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
            sent = pool.submit(client.post, "/predict", json=click(70 + round_))
            # the click waits in its replica's BATCH_WAIT_S batch window
            victim = wait_until(lambda: sent.done() or replica_holding_a_request(service), BATCH_WAIT_S,
                                "a Detector replica holding the click", every_s=0.25)
            if sent.done():  # answered before its replica was seen holding it: again
                continue
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            answer = sent.result()
            answered_s = time.monotonic() - killed_at
        after = counters(service, until=lambda now: replica_failures(now) > replica_failures(before))
        if replica_failures(after) > replica_failures(before):
            break
    else:
        pytest.fail("the click was never on the killed replica when it died")
    # the bug (issue #30): once the retry outlived REPLICA_RETRY_TIMEOUT_S the ingress asked Serve about the
    # Segmenter deployment, which this app lacks, found no running replica and answered 503
    assert answer.status_code == 200, answer.text
    [brush] = [region for region in answer.json()["results"][0]["result"] if region["type"] == "brushlabels"]
    assert brush["value"]["format"] == "rle" and brush["value"]["brushlabels"] == ["cats"]
    assert (brush["original_width"], brush["original_height"]) == (WIDTH, HEIGHT)
    assert decode_rle(brush["value"]["rle"]).size == WIDTH * HEIGHT * 4
    # the lost call was the Detector's, and the scenario reached the wait beyond REPLICA_RETRY_TIMEOUT_S
    assert after.get("detector_replica_failures", 0) == before.get("detector_replica_failures", 0) + 1, after
    assert answered_s > 1, f"the retry was answered {answered_s:.2f} s after the kill, within REPLICA_RETRY_TIMEOUT_S"
    assert service.wait_for_log(r"Detector retry not answered after 1 s: waiting while Serve reports a running replica")
    assert after.get("predict_unavailable", 0) == before.get("predict_unavailable", 0)  # no 503 for it
