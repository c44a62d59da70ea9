"""`grounded-serve prelabel` against a real Label Studio and the real service: a 50-task project,
interrupted with SIGINT and resumed, and a project with broken images."""

from __future__ import annotations

import collections
import http.server
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio as LabelStudioClient

from tests.configs import SEED_CONFIG
from tests.imaging import pattern, png_bytes
from tests.label_studio import LEGACY_TOKEN
from tests.loopback import loopback_http
from tests.serve_process import ServeProcess

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.timeout(600)]  # Label Studio starts too

IMAGE = png_bytes(pattern(96, 128, seed=11))
CLI = Path(sys.executable).parent / "grounded-serve"


class PacedImages(http.server.BaseHTTPRequestHandler):
    """Every image takes 0.3 s, so a 50-task run lasts long enough to interrupt; /missing/* is a 404."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/missing/"):
            self.send_error(404)
            return
        time.sleep(0.3)
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        self.wfile.write(IMAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def images():
    with loopback_http(PacedImages) as url:
        yield url


@pytest.fixture(scope="module")
def service(label_studio, tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
           "SAM_CHECKPOINT": str(tiny_models["sam"]), "IMAGE_HOST_ALLOWLIST": "127.0.0.1"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(label_studio):
    return LabelStudioClient(base_url=label_studio.url, api_key=LEGACY_TOKEN)


def make_project(client, title: str, urls: list[str]) -> int:
    project = client.projects.create(title=title, label_config=SEED_CONFIG)
    client.projects.import_tasks(project.id, request=[{"image": url} for url in urls])
    return project.id


def prelabel(label_studio, service, project: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
           "GROUNDED_SERVE_URL": service.url}
    return subprocess.Popen([str(CLI), "prelabel", "--project", str(project), "--chunk-size", "4",
                             "--concurrency", "2", "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def predictions_per_task(client, project: int) -> collections.Counter:
    return collections.Counter(p.task for p in client.predictions.list(project=project))


def test_interrupted_run_resumes_without_duplicates(label_studio, service, client, images):
    project = make_project(client, "prelabel resume", [f"{images}/img{i}.png" for i in range(50)])
    task_ids = {t.id for t in client.tasks.list(project=project)}

    first = prelabel(label_studio, service, project)
    deadline = time.monotonic() + 120
    while sum(predictions_per_task(client, project).values()) < 8 and time.monotonic() < deadline:
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 130, output
    assert "interrupted" in output
    partial = predictions_per_task(client, project)
    assert 8 <= sum(partial.values()) < 50, output
    assert set(partial.values()) == {1}

    second = prelabel(label_studio, service, project)
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert "skipped (already had" in output and f"{sum(partial.values())} skipped" in output
    counts = predictions_per_task(client, project)
    assert set(counts) == task_ids and set(counts.values()) == {1}  # every task, exactly once
    for prediction in client.predictions.list(project=project)[:5]:
        assert {r["type"] for r in prediction.result} == {"rectanglelabels", "brushlabels"}
        assert {r["value"][r["type"]][0] for r in prediction.result} <= {"cats", "house"}


def test_broken_images_are_counted_as_failed_and_retried_next_time(label_studio, service, client, images):
    urls = [f"{images}/ok{i}.png" for i in range(7)] + [f"{images}/missing/{i}.png" for i in range(3)]
    project = make_project(client, "prelabel broken", urls)
    run = prelabel(label_studio, service, project, "--prompt", "brown cat_cats")
    output, _ = run.communicate(timeout=300)
    assert run.returncode == 1, output
    assert "7 pre-labelled, 0 skipped" in output and "3 failed, of 10 tasks" in output
    assert output.count("HTTP 404") >= 3
    counts = predictions_per_task(client, project)
    broken = {t.id for t in client.tasks.list(project=project) if "/missing/" in t.data["image"]}
    assert len(counts) == 7 and not broken & set(counts) and set(counts.values()) == {1}
    labels = {r["value"][r["type"]][0] for p in client.predictions.list(project=project) for r in p.result}
    assert labels == {"cats"}

    again = prelabel(label_studio, service, project, "--prompt", "brown cat_cats")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 1 and "0 pre-labelled, 7 skipped" in output and "3 failed" in output
    assert predictions_per_task(client, project) == counts  # nothing duplicated
