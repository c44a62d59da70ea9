"""A wedged ingress is detected and replaced (issue 14 item 11): its process is frozen with SIGSTOP, so neither
its event loop nor anything else in it runs, and the service must come back with a new ingress replica
instead of accepting requests and answering none. Health-check timings are shortened for the test."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

pytestmark = pytest.mark.serve


def quick_health_checks(config):
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Ingress":
            deployment.update(health_check_period_s=1, health_check_timeout_s=3, graceful_shutdown_timeout_s=2)


def ingress_pids(service: ServeProcess) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(proc.pid) == service.process.pid and \
                    "ServeReplica:grounded-serve:Ingress" in " ".join(proc.info["cmdline"] or []):
                pids.append(proc.pid)
        except (psutil.NoSuchProcess, OSError):
            continue
    return pids


def test_a_frozen_ingress_is_replaced_and_the_service_answers_again(tiny_models, tmp_path):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"])}
    service = ServeProcess(env, tmp_path, config_overrides=quick_health_checks).start()
    try:
        [frozen] = ingress_pids(service)
        os.kill(frozen, signal.SIGSTOP)
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{service.url}/health", timeout=2)  # accepted by the proxy, answered by nobody
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            replacements = [pid for pid in ingress_pids(service) if pid != frozen]
            try:
                if replacements and httpx.get(f"{service.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("no new ingress replica answered /health within 90 s")
        body = {"tasks": [{"id": 1, "data": {"image": data_url(png_bytes(pattern(60, 80, seed=3)))}}],
                "label_config": '<View><Image name="image" value="$image"/><RectangleLabels name="l" '
                                'toName="image"><Label value="cats"/></RectangleLabels></View>'}
        response = httpx.post(f"{service.url}/predict", json=body, timeout=60)
        assert response.status_code == 200 and len(response.json()["results"]) == 1
    finally:
        for pid in ingress_pids(service) if service.process else []:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        service.stop()
