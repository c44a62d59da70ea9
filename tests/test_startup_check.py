"""`grounded-serve check` (issue 28, item 6): a refused configuration fails the start command with the message,
instead of `serve run` running on with no application."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serve_app.cli import main
from serve_app.startup_check import CheckFailed, run_check
from tests.conftest import ROOT


def tiny_env(tiny_models, **extra) -> dict[str, str]:
    return {"DETECTOR_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
            "SAM_CHECKPOINT": str(tiny_models["sam"]), "HF_HUB_OFFLINE": "1", **extra}


def test_the_tiny_setup_passes_and_says_what_would_run(tiny_models):
    lines = run_check(str(ROOT / "configs" / "serve.yaml"), env=tiny_env(tiny_models))
    assert lines[0] == "pipeline: detect+segment"
    assert any(str(tiny_models["sam"]) in line for line in lines)


@pytest.mark.parametrize("extra, message", [
    ({"LABEL_STUDIO_API_KEY": "k"}, "LABEL_STUDIO_API_KEY is set but LABEL_STUDIO_URL is not"),
    ({"PREDICT_DEADLINE_S": "inf"}, "not a finite number"),
    ({"TASK_TIMEOUT_S": "1e300"}, "TASK_TIMEOUT_S must be"),
    ({"REPLICA_RETRY_TIMEOUT_S": "inf"}, "not a finite number"),
    ({"PREDICT_DEADLINE_S": "93"}, "request_timeout_s=95"),
    ({"PIPELINE": "concept"}, "PIPELINE=concept needs a SAM 3 checkpoint"),
    ({"SAM_CHECKPOINT": "/nowhere/sam.pth"}, "no such file"),
    ({"DETECTOR_MODEL": "IDEA-Research/not-downloaded"}, "not in the Hugging Face cache and HF_HUB_OFFLINE=1"),
])
def test_a_refused_configuration_fails_with_its_reason(tiny_models, extra, message):
    with pytest.raises(CheckFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_check(str(ROOT / "configs" / "serve.yaml"), env=tiny_env(tiny_models, **extra))


def test_the_command_exits_non_zero_with_the_message(tiny_models, tmp_path):
    env = {"PATH": "/usr/bin:/bin", **tiny_env(tiny_models, LABEL_STUDIO_API_KEY="k")}
    done = subprocess.run([sys.executable, "-m", "serve_app.cli", "check", str(ROOT / "configs" / "serve.yaml")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "LABEL_STUDIO_URL" in done.stderr
    ok = subprocess.run([sys.executable, "-m", "serve_app.cli", "check", str(ROOT / "configs" / "serve.yaml")],
                        env={"PATH": "/usr/bin:/bin", **tiny_env(tiny_models)}, cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("grounded-serve check: ok"), ok.stderr


def test_main_reads_the_environment(tiny_models, monkeypatch, capsys):
    for name, value in tiny_env(tiny_models).items():
        monkeypatch.setenv(name, value)
    assert main(["check", "-"]) == 0
    assert "pipeline: detect+segment" in capsys.readouterr().out
