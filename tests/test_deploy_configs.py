"""Deployment files stay valid and in step with configs/serve.yaml, checked without any cloud."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.serve_process import ROOT, SERVE_CONFIG

CLUSTER = ROOT / "cluster.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before validating: defaults merged
    validate_config(prepared)
    gpu = prepared["available_node_types"]["ray.worker.g5"]
    assert gpu["min_workers"] == 0 and gpu["node_config"]["InstanceType"].startswith("g5.")
    assert prepared["docker"]["image"].startswith("rayproject/ray:2.60.") and prepared["docker"]["image"].endswith("-gpu")
    commands = " ".join(prepared["head_start_ray_commands"])
    assert "serve deploy configs/serve.yaml" in commands
    assert any("pip install" in c and "grounded-serve" in c for c in prepared["setup_commands"])


def test_cluster_yaml_validation_catches_mistakes():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    config["available_node_types"]["ray.worker.g5"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def serve_config_of_rayservice() -> dict:
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["kind"] == "RayService"
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def test_rayservice_serve_config_matches_configs_serve_yaml():
    """The only allowed differences: listen on all interfaces in the pod, and ask for GPUs from the start
    (the GPU worker group may be scaled to zero when the app is built)."""
    expected = yaml.safe_load(SERVE_CONFIG.read_text())
    expected["http_options"]["host"] = "0.0.0.0"
    expected["http_options"]["port"] = 8000
    expected["applications"][0]["args"]["accelerator"] = "gpu"
    assert serve_config_of_rayservice() == expected


def test_rayservice_gpu_workers_request_gpus():
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    spec = manifest["spec"]["rayClusterConfig"]
    [gpu_group] = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    container = gpu_group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_group["minReplicas"] == 0 and gpu_group["maxReplicas"] >= 1
    assert spec["enableInTreeAutoscaling"] is True
    for group in [spec["headGroupSpec"], gpu_group]:
        assert group["template"]["spec"]["containers"][0]["image"].startswith("grounded-serve:")


def test_committed_rayservice_is_the_rendered_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", ROOT / "deploy" / "kuberay" / "render_rayservice.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert RAYSERVICE.read_text() == render.render(), "run: python deploy/kuberay/render_rayservice.py"


def test_dockerfile_lints_clean():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text and "serve run" in text


def test_compose_file_runs_label_studio_and_the_service():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"label-studio", "grounded-serve"}
    assert "9090:9090" in services["grounded-serve"]["ports"]
    env = dict(item.split("=", 1) for item in services["grounded-serve"]["environment"])
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"


HUB_MODEL_TYPES = {  # config.json model_type of the hub checkpoints the example pipelines name
    "IDEA-Research/grounding-dino-tiny": "grounding-dino", "google/owlv2-base-patch16-ensemble": "owlv2",
    "omlab/omdet-turbo-swin-tiny-hf": "omdet-turbo", "facebook/sam3": "sam3_video",
    "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg": "mm-grounding-dino",
}


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def test_every_example_pipeline_is_valid_documented_and_what_it_says():
    from serve_app.graph_plan import choose_pipeline
    from serve_app.settings import Settings

    files = sorted((ROOT / "configs" / "pipelines").glob("*.env"))
    assert {read_env_file(f)["PIPELINE"] for f in files} == {"detect", "detect+segment", "concept"}
    models_doc = (ROOT / "docs" / "models.md").read_text()
    for path in files:
        env = read_env_file(path)
        settings = Settings.load({}, env=env)
        assert choose_pipeline(settings, model_type_of=HUB_MODEL_TYPES.get) == env["PIPELINE"], path.name
        assert f"configs/pipelines/{path.name}" in models_doc


def test_model_replicas_drain_their_work_before_autoscaling_removes_them():
    """Serve force-kills a replica it scales down once graceful_shutdown_timeout_s (default 20 s) has passed; a CPU
    replica holding full-size batches needs minutes, and a killed replica's tasks fail."""
    from serve_app.deployments.detector import Detector
    from serve_app.deployments.segmenter import Segmenter

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    [detector] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Detector"]
    assert detector["graceful_shutdown_timeout_s"] >= 300
    for deployment in (Detector, Segmenter):  # the code's defaults, used where the config names none
        assert deployment._deployment_config.graceful_shutdown_timeout_s >= 300
