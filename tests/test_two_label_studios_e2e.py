"""Two real Label Studio instances on one service (issue 29): both have a project 1 with the same task ids, each
with its own uploaded images and its own legacy token, connected with no LABEL_STUDIO_URL (each instance's /setup
hostname and token are the credential). Retrieve (past a low deadline, so part of it is a background job) and
interactive calls in both at once: each instance ends with exactly one prediction per task, computed from its own
images (their sizes differ), written with its own token. A request with the other instance's token would be a 401
there, and that task would fail; none does.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from label_studio_sdk import LabelStudio as LabelStudioClient

from tests.configs import SEED_CONFIG
from tests.imaging import pattern, png_bytes
from tests.label_studio import LEGACY_TOKEN, LabelStudio
from tests.loopback import image_handler, loopback_http
from tests.serve_process import ServeProcess
from tests.test_label_studio_e2e import upload_files
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.timeout(600)]  # Label Studio starts too

TOKEN_B = "second-instance-token-9876543210"
SIZES = {"A": (160, 120), "B": (96, 200)}  # (width, height) of each instance's uploads
UPLOADS = 6
SLOW = 6  # tasks with slow URL images first, so the rest finish after the deadline in a background job


@pytest.fixture(scope="module")
def second_label_studio(tmp_path_factory):
    from tests.label_studio import label_studio_binary

    if label_studio_binary() is None:
        pytest.skip("Label Studio is not installed: run scripts/install-label-studio")
    server = LabelStudio(tmp_path_factory.mktemp("label-studio-b"),
                         extra_env={"LABEL_STUDIO_USER_TOKEN": TOKEN_B}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def slow_images():
    with loopback_http(image_handler(png_bytes(pattern(64, 64, seed=9)), delay_s=1.0)) as url:
        yield url


def make_project(label_studio, token: str, width: int, height: int, slow_images: str):
    client = LabelStudioClient(base_url=label_studio.url, api_key=token)
    project = client.projects.create(title="same id", label_config=SEED_CONFIG)
    client.projects.import_tasks(project.id, request=[{"image": f"{slow_images}/s{i}.png"} for i in range(SLOW)])
    uploads = {f"file{i}": (f"img{i}.png", png_bytes(pattern(height, width, seed=i)), "image/png")
               for i in range(UPLOADS)}
    uploaded = upload_files(label_studio.url, {"Authorization": f"Token {token}"}, project.id, uploads)
    return client, project, uploaded


def test_two_instances_with_project_1_each_store_their_own_predictions(
        label_studio, second_label_studio, tiny_models, slow_images, tmp_path_factory):
    service = ServeProcess({"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
                            "SAM_CHECKPOINT": str(tiny_models["sam"]), "IMAGE_HOST_ALLOWLIST": "127.0.0.1",
                            "PREDICT_DEADLINE_S": "2", "TASK_CONCURRENCY": "2", "BACKGROUND_TASK_CONCURRENCY": "2"},
                           tmp_path_factory.mktemp("serve")).start()
    try:
        instances = {"A": (label_studio, LEGACY_TOKEN), "B": (second_label_studio, TOKEN_B)}
        # Both projects are created at once, just after a second begins, as two fresh instances set up together
        # would be: their project names ("1.<created-at>") then usually collide, and each request is matched to its
        # instance by the task it holds (serve_app.ingress.instances.owner_of).
        time.sleep(1 - time.time() % 1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            made = dict(zip(instances, pool.map(lambda item: make_project(item[1][0], item[1][1], *SIZES[item[0]],
                                                                          slow_images), instances.items())))
        assert made["A"][1].id == made["B"][1].id == 1 and made["A"][2] == made["B"][2]  # same ids in both
        mls = {name: client.ml.create(project=project.id, url=service.url, is_interactive=True, title=name)
               for name, (client, project, _) in made.items()}
        version = httpx.get(f"{service.url}/health").json()["model_version"]

        def retrieve(name):
            client, project, _ = made[name]
            client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                                  selected_items={"all": True, "excluded": []})

        def interactive(name):
            client, _, uploaded = made[name]
            context = {"result": [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea",
                                   "origin": "manual", "value": {"text": ["a cat_cats"]}}]}
            return client.ml.with_raw_response.predict_interactive(mls[name].id, task=uploaded[0],
                                                                   context=context).response.json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(retrieve, "A"), pool.submit(retrieve, "B"),
                     pool.submit(interactive, "A"), pool.submit(interactive, "B")]
            answers = [call.result(timeout=300) for call in calls]
        for name, answer in zip("AB", answers[2:]):
            assert "errors" not in answer, (name, answer)
            width, height = SIZES[name]
            assert answer["data"]["result"] and all(
                (r["original_width"], r["original_height"]) == (width, height) for r in answer["data"]["result"])

        def every_task_stored(client, uploaded):
            stored = {t: client.predictions.list(task=t) for t in uploaded}
            return stored if all(stored.values()) else None

        for name, (client, project, uploaded) in made.items():
            width, height = SIZES[name]
            stored = wait_until(lambda: every_task_stored(client, uploaded), 240, f"{name}'s predictions", every_s=1)
            assert {t: len(p) for t, p in stored.items()} == {t: 1 for t in uploaded}, name
            for predictions in stored.values():
                assert predictions[0].model_version == version
                assert all((r["original_width"], r["original_height"]) == (width, height)
                           for r in predictions[0].result), name  # its own images, not the other instance's
        listing = httpx.get(f"{service.url}/jobs", timeout=10).json()
        origins = {f"http://127.0.0.1:{ls.port}" for ls in (label_studio, second_label_studio)}
        background = {job["instance"]: job for job in listing["jobs"]}
        assert set(background) == origins, listing  # each instance had a background job, under its own name
        for job in background.values():
            assert job["tasks"]["failed"] == 0 and job["tasks"]["stored"] > 0, job
    finally:
        service.stop()
