"""Two Ray nodes on loopback, each declaring one logical GPU: GPU-fraction placement, Serve autoscaling
up and down under bounded load, and a worker node stopped and restarted while requests keep working.

The GPUs are logical (Ray schedules by declared resources; there is no CUDA here), so replicas ask for
0.5 GPU each and still run on the CPU, which is exactly how the same config behaves on a GPU cluster.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import load_ls_fixture
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess, free_port, model_deployments

pytestmark = [pytest.mark.serve, pytest.mark.timeout(400)]  # a two-node cluster, scaling both ways

IMAGE = data_url(png_bytes(pattern(96, 128, seed=3)))


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="gs-mn-", dir="/tmp")  # short: unix socket paths are limited
    # Ray writes the head's address to $RAY_TMPDIR/ray/ray_current_cluster (else /tmp/ray, which a fresh machine
    # lacks: the head failed to start there), and worker nodes' sessions go there too: all of it in ours
    (Path(temp_dir) / "ray").mkdir()
    try:
        with pytest.MonkeyPatch.context() as environment:
            environment.setenv("RAY_TMPDIR", temp_dir)
            cluster = Cluster(initialize_head=True, connect=True, head_node_args={
                "num_cpus": 2, "num_gpus": 1, "resources": {"head_node": 1}, "include_dashboard": True,
                "dashboard_host": "127.0.0.1", "dashboard_port": free_port(), "temp_dir": temp_dir})
            try:
                worker = cluster.add_node(num_cpus=2, num_gpus=1, resources={"worker_node": 1})
                cluster.wait_for_nodes()
                yield cluster, worker
            finally:
                ray.shutdown()
                cluster.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray leaves its session logs and sockets there


def multinode_config(tiny_models):
    def override(config):
        app = config["applications"][0]
        app["args"].update(accelerator="gpu", detector_gpus=0.5, segmenter_gpus=0.5, detector_cpus=0.25,
                           segmenter_cpus=0.25, detector_model=str(tiny_models["grounding_dino"]),
                           use_sam=True, sam_checkpoint=str(tiny_models["sam"]), replica_retry_timeout_s=60)
        detector, segmenter = model_deployments(config)
        detector["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
            "upscale_delay_s": 1, "downscale_delay_s": 4,
            "look_back_period_s": 2}
        detector["max_ongoing_requests"] = 8
        detector["user_config"]["batch_wait_timeout_s"] = 0.3  # keeps requests ongoing under load
        segmenter.update(autoscaling_config=None, num_replicas=1)
    return override


@pytest.fixture(scope="module")
def service(cluster, tiny_models, tmp_path_factory):
    head, _ = cluster
    process = ServeProcess({}, tmp_path_factory.mktemp("serve"), config_overrides=multinode_config(tiny_models),
                           address=head.address).start()
    yield process
    process.stop()


def predict_body(tasks: int = 2) -> dict:
    body = load_ls_fixture("predict_interactive.json")["body"]
    body["tasks"] = [dict(body["tasks"][0], id=i, data={"image": IMAGE}) for i in range(tasks)]
    return body


def replicas() -> dict[str, list[str]]:
    """Deployment name -> node ids of its live replicas."""
    from ray.util.state import list_actors

    placed: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith("ServeReplica:grounded-serve:"):
            placed.setdefault(actor.class_name.rsplit(":", 1)[1], []).append(actor.node_id)
    return placed


def running(deployment: str) -> int:
    from ray import serve

    overview = serve.status().applications["grounded-serve"].deployments[deployment]
    return overview.replica_states.get("RUNNING", 0)


def test_replicas_take_half_a_gpu_each(service):
    import ray

    placed = replicas()
    assert len(placed["Detector"]) == 1 and len(placed["Segmenter"]) == 1 and len(placed["Ingress"]) == 1
    assert ray.cluster_resources()["GPU"] == 2
    # two model replicas at 0.5 GPU each hold exactly one GPU; the ingress holds none
    assert ray.available_resources().get("GPU", 0) == pytest.approx(1.0)
    for node_id in placed["Detector"] + placed["Segmenter"]:
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        assert node["Resources"]["GPU"] == 1


def test_detector_scales_up_under_load_and_back_down(service):
    import ray

    async def load(seconds: float) -> list[int]:
        statuses = []
        deadline = time.monotonic() + seconds

        async def client(session):
            while time.monotonic() < deadline:
                statuses.append((await session.post("/predict", json=predict_body(4))).status_code)

        async with httpx.AsyncClient(base_url=service.url, timeout=60) as session:
            worker = asyncio.gather(*(client(session) for _ in range(8)))
            peak = 1
            while time.monotonic() < deadline:
                await asyncio.sleep(1)
                peak = max(peak, await asyncio.to_thread(running, "Detector"))
                if peak >= 2:
                    break
            await worker
        return statuses, peak

    statuses, peak = asyncio.run(load(60))
    assert peak >= 2, "the detector never scaled up"
    assert set(statuses) == {200}
    # 3 detectors + 1 segmenter at 0.5 GPU fit the 2 logical GPUs; more replicas would not be placed
    assert len(replicas()["Detector"]) <= 3
    assert ray.available_resources().get("GPU", 0) >= 0
    deadline = time.monotonic() + 90
    while running("Detector") > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert running("Detector") == 1, "the detector did not scale back down"


def test_a_request_succeeds_while_a_worker_node_restarts(cluster, service):
    import ray

    head, worker = cluster
    head.remove_node(worker)
    try:
        response = httpx.post(f"{service.url}/predict", json=predict_body(2), timeout=120)
        assert response.status_code == 200, response.text
        assert all(r["result"] for r in response.json()["results"])
        assert {node_id for ids in replicas().values() for node_id in ids} == {head.head_node.node_id}
    finally:
        new_worker = head.add_node(num_cpus=2, num_gpus=1, resources={"worker_node": 1})
        head.wait_for_nodes()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    response = httpx.post(f"{service.url}/predict", json=predict_body(2), timeout=120)
    assert response.status_code == 200 and all(r["result"] for r in response.json()["results"])
    assert new_worker.node_id != worker.node_id
