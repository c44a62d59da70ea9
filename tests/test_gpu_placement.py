"""How the model replicas share GPUs (serve_app.gpu_placement, docs/gpu-placement.md): the fractions, Ray's best-fit
placement replayed on 1, 2 and 8 GPUs, the throughput it predicts, and one real service on logical GPUs whose
replicas land where the replay says."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import httpx
import pytest

from serve_app.app import warn_if_unplaceable
from serve_app.gpu_placement import gpu_fractions, place, predict
from serve_app.settings import Settings, SettingsError

ROLES = ("Detector", "Segmenter", "Tracker")


def replicas(fractions: dict[str, float], sets: int) -> list[tuple[str, float]]:
    return [(role, fraction) for role, fraction in fractions.items() for _ in range(sets)]


def test_auto_fractions_give_every_model_role_an_equal_share_of_one_gpu():
    auto = dict.fromkeys(ROLES)
    assert gpu_fractions(["Detector", "Segmenter"], auto) == {"Detector": 0.5, "Segmenter": 0.5}
    assert gpu_fractions(ROLES, auto) == dict.fromkeys(ROLES, 0.3333)
    assert gpu_fractions(["Detector"], auto) == {"Detector": 0.5}  # SAM 3 alone: two replicas a GPU
    assert gpu_fractions(ROLES, {"Detector": 1.0, "Segmenter": None, "Tracker": 0.1}) == {
        "Detector": 1.0, "Segmenter": 0.3333, "Tracker": 0.1}


def test_the_former_fixed_fractions_left_the_tracker_waiting_on_one_gpu():
    """0.5 + 0.5 + 0.25: a one-GPU box with TRACKER_MODEL never got its Tracker, and the service never got ready."""
    old = place([("Detector", 0.5), ("Segmenter", 0.5), ("Tracker", 0.25)], [1])
    assert old.pending == ["Tracker"]
    auto = gpu_fractions(ROLES, dict.fromkeys(ROLES))
    assert place(replicas(auto, 1), [1]).pending == []


@pytest.mark.parametrize("roles", [ROLES, ROLES[:2]])
@pytest.mark.parametrize("layout", [[1], [2], [8], [1] * 2, [1] * 8, [4, 4]], ids=str)
def test_one_set_per_gpu_fills_every_gpu_in_any_start_order(roles, layout):
    fractions = gpu_fractions(roles, dict.fromkeys(roles))
    order = replicas(fractions, sum(layout))
    shuffler = random.Random(7)
    for _ in range(50):  # Serve starts a graph's replicas concurrently: the order is not ours to choose
        shuffler.shuffle(order)
        placement = place(order, layout)
        assert placement.pending == []
        assert [sum(gpu.values()) for gpu in placement.per_gpu()] == [len(roles)] * sum(layout)


def test_best_fit_pairs_the_replicas_autoscaling_adds_to_one_model():
    """Detectors scaled up alone share a GPU two by two instead of taking a GPU each."""
    placement = place([("Detector", 0.5), ("Segmenter", 0.5)] + [("Detector", 0.5)] * 4, [4])
    assert placement.per_gpu() == [Counter(Detector=1, Segmenter=1), Counter(Detector=2), Counter(Detector=2),
                                   Counter()]


def test_mixed_fractions_can_strand_a_replica_that_equal_shares_cannot():
    """Why auto shares are equal: with 0.4/0.4/0.2 two sets fill two GPUs exactly, yet two Trackers started first
    take 0.4 of GPU 0 and the last Segmenter fits nowhere."""
    mixed = [("Tracker", 0.2), ("Tracker", 0.2), ("Detector", 0.4), ("Detector", 0.4), ("Segmenter", 0.4),
             ("Segmenter", 0.4)]
    assert place(mixed, [2]).pending == ["Segmenter"]


def test_a_gpu_fraction_above_one_must_be_whole():
    with pytest.raises(SettingsError, match="whole number"):
        Settings.load(env={"SEGMENTER_GPUS": "1.5"})
    assert Settings.load(env={"SEGMENTER_GPUS": "2"}).segmenter_gpus == 2
    assert Settings.load(env={"TRACKER_GPUS": "auto"}).tracker_gpus is None


def test_the_prediction_adds_ingress_replicas_before_the_cpu_side_binds():
    """One H100 served 11.9 tasks/s with masks; the null-model ceiling measured 13.7 ms of ingress CPU a task."""
    one = predict(1, 11.9, 0.0137)
    eight = predict(8, 11.9, 0.0137)
    assert (one.ingress_replicas, one.tasks_per_s) == (1, 11.9)
    assert eight.gpu_tasks_per_s == pytest.approx(95.2) and eight.ingress_replicas == 2
    assert predict(8, 11.9, 0.0137, ingress_replicas=1).tasks_per_s == pytest.approx(51.1)  # the ingress binds


def test_a_fraction_that_fits_nowhere_is_named_at_build_time(monkeypatch, caplog):
    import ray

    # stands in for a connected cluster: a one-GPU node, as ray.nodes() reports it
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}}])
    with caplog.at_level("WARNING"):
        warn_if_unplaceable({"Detector": 0.5, "Segmenter": 0.5, "Tracker": 0.25})
    assert "Tracker will wait for a GPU" in caplog.text
    caplog.clear()
    warn_if_unplaceable(gpu_fractions(ROLES, dict.fromkeys(ROLES)))
    assert caplog.text == ""


PLACED = re.compile(r"placed (\w+) replica: node \w+, GPU ids \[([\d,]*)\]")


@pytest.mark.serve
@pytest.mark.timeout(420)
def test_two_sets_on_two_logical_gpus_land_where_the_replay_says(tiny_models, tmp_path_factory):
    """A real service on a Ray node declaring two GPUs (logical: the replicas still run on the CPU), two replicas
    of each of the three model roles at the auto fractions: every replica starts, and each GPU holds three."""
    from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family
    from tests.conftest import load_ls_fixture
    from tests.imaging import data_url, pattern, png_bytes
    from tests.serve_process import ServeProcess, model_deployments
    from tests.waiting import wait_until

    sam2 = make_tiny_sam_family(tmp_path_factory.mktemp("placement-sam2"), "sam2_video", seed=2)

    def two_of_each(config):
        app = config["applications"][0]
        app["args"].update(accelerator="gpu", detector_cpus=0.25, segmenter_cpus=0.25, tracker_cpus=0.25)
        for deployment in model_deployments(config):
            deployment.update(autoscaling_config=None, num_replicas=2)
        app["deployments"].append({"name": "Tracker", "autoscaling_config": None, "num_replicas": 2})

    env = {"DETECTOR_MODEL": str(tiny_models["grounding_dino"]), "SEGMENTER_MODEL": str(sam2),
           "TRACKER_MODEL": str(sam2), "RAY_OVERRIDE_RESOURCES": '{"GPU": 2, "CPU": 8}'}
    service = ServeProcess(env, tmp_path_factory.mktemp("serve"), config_overrides=two_of_each,
                           startup_timeout_s=360)
    service.start()
    try:
        # each replica's own log file: `serve run`'s output folds lines that repeat across replicas
        def placed():
            found = [line for path in Path(service.ray_tmp).glob("**/logs/serve/replica_*.log")
                     for line in PLACED.findall(path.read_text(errors="replace"))]
            return len(found) >= 6 and found

        lines = wait_until(placed, timeout_s=60, what="six placement lines")
        by_replica = Counter(role for role, _ in lines)
        assert by_replica == Counter(Detector=2, Segmenter=2, Tracker=2), lines
        per_gpu = Counter(gpu for _, gpu in lines)
        predicted = place(replicas(gpu_fractions(ROLES, dict.fromkeys(ROLES)), 2), [2])
        assert sorted(per_gpu.values()) == sorted(sum(gpu.values()) for gpu in predicted.per_gpu()) == [3, 3]
        assert set(per_gpu) == {"0", "1"}  # one id each: no replica was split across GPUs
        body = load_ls_fixture("predict_interactive.json")["body"]
        body["tasks"] = [dict(body["tasks"][0], id=1, data={"image": data_url(png_bytes(pattern(96, 128, 3)))})]
        response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
        assert response.status_code == 200 and response.json()["results"][0]["result"], response.text
    finally:
        service.stop()


def test_gpu_plan_prints_the_layout_the_prediction_and_the_config(capsys):
    from serve_app.cli import main

    assert main(["gpu-plan", "--gpus", "8", "--tracker"]) == 0
    out = capsys.readouterr().out
    assert out.count("Detector, Segmenter, Tracker") == 8 and "waiting" not in out
    assert "predicted: 95.2 tasks/s" in out and "Ingress num_replicas: 2" in out
    assert "Tracker autoscaling_config.max_replicas: 8" in out
