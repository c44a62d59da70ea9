"""End to end with a real Label Studio 1.23 and the real service, once per kind of API key.

Label Studio runs with prediction validation on, so a label or region its config does not allow
fails the "Retrieve predictions" action. Images reach the service the ways Label Studio hands them
over: uploads (/data/upload/..., fetched with the API key), plain http URLs and data URLs.
"""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import httpx
import pytest
from label_studio_sdk import LabelStudio as LabelStudioClient
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from serve_app.label_studio.credentials import LabelStudioCredentials
from serve_app.tiny_models.sam3 import make_tiny_sam3_video
from tests.configs import SEED_CONFIG
from tests.imaging import data_url, jpeg_with_orientation, pattern, png_bytes
from tests.label_studio import LEGACY_TOKEN
from tests.serve_process import ServeProcess

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.timeout(600)]  # Label Studio starts too

LABELS = {"cats", "house"}


def upload_files(ls_url: str, headers: dict, project_id: int, files: dict[str, tuple[str, bytes, str]]) -> list[int]:
    """Multipart upload as the UI does it; one field name per file (a repeated name keeps only the last)."""
    response = httpx.post(f"{ls_url}/api/projects/{project_id}/import", headers=headers, timeout=120,
                          params={"return_task_ids": True},
                          files={field: (name, data, mime) for field, (name, data, mime) in files.items()})
    response.raise_for_status()
    return response.json()["task_ids"]


# How the service learns where Label Studio is and which key to send:
#   legacy token / personal access token: LABEL_STUDIO_URL + LABEL_STUDIO_API_KEY in its environment;
#   setup: nothing in its environment; it uses the hostname and token Label Studio sends to /setup.
#   In "setup" mode the service also requires HTTP Basic auth, and Label Studio connects with its
#   "Basic auth" option.
BASIC_AUTH = ("labeler", "s3cret-pass")
MODES = {
    "legacy token": "legacy token from LABEL_STUDIO_API_KEY",
    "personal access token": "personal access token from LABEL_STUDIO_API_KEY",
    "setup": "legacy token from the access_token Label Studio sent to /setup",
    # once more with SAM 3 (tiny, the hub's sam3_video layout) as DETECTOR_MODEL: the concept pipeline
    "sam3 concept": "legacy token from LABEL_STUDIO_API_KEY",
}


@pytest.fixture(scope="module", params=list(MODES))
def run(request, label_studio, tiny_models, image_server, tmp_path_factory):
    key = label_studio.personal_access_token() if request.param == "personal access token" else LEGACY_TOKEN
    env = {
        "GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]),
        "USE_SAM": "true",
        "SAM_CHECKPOINT": str(tiny_models["sam"]),
        # the /setup hostname is not trusted to be private unless allowed
        "IMAGE_HOST_ALLOWLIST": "127.0.0.1",
    }
    if request.param == "sam3 concept":  # masks from SAM 3 itself; its random scores sit near 0.25
        sam3 = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3"), seed=3)
        env = {"DETECTOR_MODEL": str(sam3), "BOX_THRESHOLD": "0", "EXEMPLAR_THRESHOLD": "0",
               "MAX_DETECTIONS": "4", "IMAGE_HOST_ALLOWLIST": "127.0.0.1"}
    if request.param != "setup":
        env.update({"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": key})
    else:
        env.update({"BASIC_AUTH_USER": BASIC_AUTH[0], "BASIC_AUTH_PASS": BASIC_AUTH[1]})
    service = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    client = LabelStudioClient(base_url=label_studio.url, api_key=key)
    project = client.projects.create(title=f"e2e {request.param}", label_config=SEED_CONFIG)

    if request.param != "personal access token":
        headers = {"Authorization": f"Token {key}"}
    else:
        access = httpx.post(f"{label_studio.url}/api/token/refresh/", json={"refresh": key}).json()["access"]
        headers = {"Authorization": f"Bearer {access}"}
    sizes = {}
    uploads = {
        "file0": ("plain.png", png_bytes(pattern(240, 320, seed=1)), "image/png"),
        # stored 160x120 with EXIF orientation 6: displayed, and annotated, as 120x160
        "file1": ("rotated.jpg", jpeg_with_orientation(pattern(120, 160, seed=2), 6), "image/jpeg"),
        "file2": ("large.png", png_bytes(pattern(2000, 3000, seed=3)), "image/png"),
    }
    for task_id, size in zip(upload_files(label_studio.url, headers, project.id, uploads),
                             [(320, 240), (120, 160), (3000, 2000)]):
        sizes[task_id] = size
    imported = [
        {"image": f"{image_server}/img1.png"},  # 200x300
        {"image": data_url(png_bytes(pattern(50, 70, seed=4)))},
    ]
    client.projects.import_tasks(project.id, request=imported)
    tasks = sorted(client.tasks.list(project=project.id), key=lambda t: t.id)
    for task, size in zip([t for t in tasks if t.id not in sizes], [(200, 300), (70, 50)]):
        sizes[task.id] = size
    assert len(sizes) == len(tasks) == 5
    assert any(str(t.data["image"]).startswith("/data/upload/") for t in tasks)

    auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": BASIC_AUTH[0], "basic_auth_pass": BASIC_AUTH[1]} \
        if request.param == "setup" else {}
    ml = client.ml.create(project=project.id, url=service.url, is_interactive=True,
                          title=f"grounded-serve {request.param}", **auth)
    yield SimpleNamespace(kind=request.param, credential=MODES[request.param], key=key, client=client,
                          project=project, ml=ml, ml_auth=auth, sizes=sizes,
                          service=service, label_studio=label_studio)
    service.stop()


def retrieve_predictions(run) -> None:
    run.client.actions.create(id="retrieve_tasks_predictions", project=run.project.id,
                              selected_items={"all": True, "excluded": []})


def test_retrieve_predictions_stores_a_valid_prediction_for_every_task(run):
    retrieve_predictions(run)
    version = httpx.get(f"{run.service.url}/health").json()["model_version"]
    interface = LabelInterface(SEED_CONFIG)
    for task_id, (width, height) in run.sizes.items():
        predictions = run.client.predictions.list(task=task_id)
        assert len(predictions) == 1, f"task {task_id}: {len(predictions)} predictions"
        prediction = predictions[0]
        assert prediction.model_version == version
        result = prediction.result
        kinds = {r["type"] for r in result}
        assert kinds == {"rectanglelabels", "brushlabels"}, f"task {task_id} ({run.kind}): {kinds or 'empty'}"
        assert interface.validate_prediction({"result": result})
        for region in result:
            assert region["value"][region["type"]][0] in LABELS
            assert (region["original_width"], region["original_height"]) == (width, height)
        brush = next(r for r in result if r["type"] == "brushlabels")
        assert decode_rle(brush["value"]["rle"]).size == width * height * 4


def test_basic_auth_guards_the_service_label_studio_connected_with(run):
    if run.kind != "setup":
        assert httpx.post(f"{run.service.url}/setup", json={}).status_code == 200  # no auth configured
        return
    refused = httpx.post(f"{run.service.url}/predict", json={"tasks": []})
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{run.service.url}/health").status_code == 200
    # Label Studio's own calls carried the credentials: the predictions above exist, and the backend is connected
    assert run.client.ml.get(run.ml.id).state in ("CO", "PR")


def test_retrieving_again_does_not_duplicate(run):
    retrieve_predictions(run)
    for task_id in run.sizes:
        assert len(run.client.predictions.list(task=task_id)) == 1


def test_interactive_prompt_from_the_labeling_ui(run):
    task_id = next(iter(run.sizes))
    context = {"result": [{"id": "Xy12Ab34", "from_name": "prompt", "to_name": "image", "type": "textarea",
                           "origin": "manual", "value": {"text": ["a cat_cats"]}}]}
    response = run.client.ml.with_raw_response.predict_interactive(run.ml.id, task=task_id, context=context)
    body = response.response.json()
    assert "errors" not in body, body
    regions = body["data"]["result"]
    assert regions
    assert {r["value"][r["type"]][0] for r in regions} == {"cats"}
    assert len(run.client.predictions.list(task=task_id)) == 1  # interactive results are not stored


def test_exemplar_boxes_from_the_labeling_ui(run):
    """Two boxes drawn with the exemplar control (one "cats", one "cats" + NOT), as the editor sends them through
    Label Studio's interactive endpoint, on a project whose config has both RectangleLabels."""
    from tests.configs import EXEMPLAR_CONFIG, drawn_box

    project = run.client.projects.create(title="e2e exemplars", label_config=EXEMPLAR_CONFIG)
    run.client.projects.import_tasks(project.id, request=[{"image": data_url(png_bytes(pattern(120, 160, seed=9)))}])
    [task] = run.client.tasks.list(project=project.id)
    ml = run.client.ml.create(project=project.id, url=run.service.url, is_interactive=True, title="exemplars",
                              **run.ml_auth)
    drawn = [drawn_box(region_id, x, 20.0, 25.0, 40.0, labels, image_size=(160, 120))
             for region_id, x, labels in (("aB3xY9kQ", 10.0, ["cats"]), ("k9Lm2Pq1", 55.0, ["cats", "NOT"]))]
    response = run.client.ml.with_raw_response.predict_interactive(ml.id, task=task.id, context={"result": drawn})
    body = response.response.json()
    if run.kind != "sam3 concept":  # Grounding DINO takes no exemplars. Label Studio 1.23 passes on the status
        # only, not the body that names the settings (tests/test_service.py reads that body)
        assert "400" in " ".join(body.get("errors", [])), body
        assert not run.client.predictions.list(task=task.id)
        return
    assert "errors" not in body, body
    regions = body["data"]["result"]
    assert regions and {r["value"][r["type"]][0] for r in regions} == {"cats"}
    assert {r["from_name"] for r in regions} == {"label", "mask"}  # never into the exemplar control
    assert LabelInterface(EXEMPLAR_CONFIG).validate_prediction({"result": regions})
    assert not run.client.predictions.list(task=task.id)  # interactive results are not stored


def test_a_failed_task_stores_nothing_and_a_second_retrieve_completes_it(run, image_dir, image_server):
    missing = f"/data/upload/{run.project.id}/does-not-exist.png"
    late = f"late-{run.kind.replace(' ', '-')}.png"  # an image that appears only after the first retrieval
    run.client.projects.import_tasks(run.project.id, request=[{"image": missing}, {"image": f"{image_server}/{late}"}])
    tasks = run.client.tasks.list(project=run.project.id)
    broken = next(t for t in tasks if t.data["image"] == missing)
    retried = next(t for t in tasks if t.data["image"].endswith(late))
    retrieve_predictions(run)
    # the service answered [] for both: Label Studio stored no prediction, so both stay retryable
    assert run.client.predictions.list(task=broken.id) == []
    assert run.client.predictions.list(task=retried.id) == []
    # Label Studio 1.23 answers a missing upload with a 500
    assert run.service.wait_for_log(
        rf"task {broken.id}: Label Studio answered HTTP (404|500) for {re.escape(repr(run.label_studio.url + missing))} "
        rf"\(sent: {re.escape(run.credential)}\)")
    for task_id in run.sizes:  # the others still have their one prediction
        assert len(run.client.predictions.list(task=task_id)) == 1

    (image_dir / late).write_bytes(png_bytes(pattern(60, 80, seed=11)))
    retrieve_predictions(run)
    [prediction] = run.client.predictions.list(task=retried.id)
    assert prediction.result and prediction.model_version == httpx.get(f"{run.service.url}/health").json()["model_version"]
    assert run.client.predictions.list(task=broken.id) == []  # still missing: still nothing stored
    for task_id in run.sizes:  # the second retrieval skipped the finished tasks: no duplicates
        assert len(run.client.predictions.list(task=task_id)) == 1


def test_concurrent_downloads_share_one_token_exchange(label_studio):
    key = label_studio.personal_access_token()

    async def many():
        async with httpx.AsyncClient() as client:
            credentials = LabelStudioCredentials(label_studio.url, key, client, "test")
            calls = 0
            post = client.post

            async def counting_post(*args, **kwargs):
                nonlocal calls
                calls += 1
                return await post(*args, **kwargs)

            client.post = counting_post
            headers = await asyncio.gather(*(credentials.headers() for _ in range(20)))
            forced = await credentials.headers(force_refresh=True)
            return calls, headers, forced

    calls, headers, forced = asyncio.run(many())
    assert calls == 2  # one exchange for 20 concurrent callers, one more when forced (after a 401)
    assert len({h["Authorization"] for h in headers}) == 1
    assert headers[0]["Authorization"].startswith("Bearer ")
    access = headers[0]["Authorization"].split()[1]
    assert httpx.get(f"{label_studio.url}/api/projects", headers={"Authorization": f"Bearer {access}"}).status_code == 200
    assert forced["Authorization"].startswith("Bearer ")


def test_a_wrong_key_is_a_clear_401_naming_the_credential(run):
    from serve_app.ingress.errors import ImageError
    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy

    wrong = run.key[:-4] + "AAAA" if run.kind == "personal access token" else "not-the-token"
    task = next(t for t in run.client.tasks.list(project=run.project.id) if t.data["image"].startswith("/data/upload/"))

    async def fetch():
        async with httpx.AsyncClient() as client:
            policy = ImageSourcePolicy(max_bytes=10**8, timeout_s=30, max_pixels=10**8,
                                       label_studio_url=run.label_studio.url, trust_label_studio_host=True)
            fetcher = ImageFetcher(policy, client, LabelStudioCredentials(run.label_studio.url, wrong, client,
                                                                          "LABEL_STUDIO_API_KEY"))
            return await fetcher.fetch(fetcher.resolve(task.data["image"], task.id))

    kind = "personal access token" if run.kind == "personal access token" else "legacy token"
    with pytest.raises(ImageError, match=f"{kind} from LABEL_STUDIO_API_KEY") as info:
        asyncio.run(fetch())
    assert "401" in str(info.value)
