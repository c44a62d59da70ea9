""""Retrieve predictions" on a Video project, end to end with the real Label Studio 1.23 and the real service.

Videos are uploaded to Label Studio (served from /data/upload/..., fetched with the API key). Label Studio runs
with ML_TIMEOUT_PREDICT=15 and the service answers within PREDICT_DEADLINE_S=3: the short video's tracks come back
in an answer, the long one's are stored by a background job, which reports its frames in GET /jobs.
"""

from __future__ import annotations

import httpx
import pytest
from label_studio_sdk import LabelStudio as LabelStudioClient
from label_studio_sdk.label_interface import LabelInterface

from tests.label_studio import LEGACY_TOKEN
from tests.serve_process import ServeProcess
from tests.test_label_studio_e2e import upload_files
from tests.test_video_tracks import CROSSING, VIDEO_CONFIG
from tests.videos import encode
from tests.waiting import wait_until

pytestmark = [pytest.mark.serve, pytest.mark.e2e, pytest.mark.timeout(600)]  # Label Studio starts too

LABEL_STUDIO_ENV = {"ML_TIMEOUT_PREDICT": "15"}  # read by tests/conftest.py's label_studio fixture
TRACK_FPS = 5


@pytest.fixture(scope="module")
def run(label_studio, tiny_models, tmp_path_factory):
    env = {"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "PREDICT_DEADLINE_S": "3",
           "VIDEO_TRACK_FPS": str(TRACK_FPS), "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
    service = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    client = LabelStudioClient(base_url=label_studio.url, api_key=LEGACY_TOKEN)
    project = client.projects.create(title="video e2e", label_config=VIDEO_CONFIG)
    videos = {"file0": ("short.mp4", encode(CROSSING, seconds=2), "video/mp4"),
              # 300 frames to search: far more than 3 s of this machine's detector
              "file1": ("long.mp4", encode(CROSSING, seconds=60, fps=10), "video/mp4")}
    short, long = upload_files(label_studio.url, {"Authorization": f"Token {LEGACY_TOKEN}"}, project.id, videos)
    client.ml.create(project=project.id, url=service.url, is_interactive=True, title="grounded-serve video")
    yield client, project, service, {"short": (short, 2.0), "long": (long, 60.0)}
    service.stop()


def test_retrieve_stores_one_track_per_object_and_a_long_video_finishes_in_the_background(run):
    client, project, service, tasks = run
    assert all(client.tasks.get(task_id).data["video"].startswith("/data/upload/") for task_id, _ in tasks.values())
    client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                          selected_items={"all": True, "excluded": []})

    def jobs():
        return httpx.get(f"{service.url}/jobs").json()["jobs"]

    # Label Studio 1.23 may send the selected tasks in more than one /predict: each is a job of its own.
    # While the long video runs in the background, GET /jobs counts its frames (the total from its header).
    def long_running():
        return next((j for j in jobs() if j["state"] == "running" and j.get("frames", {}).get("done")), None)

    running = wait_until(long_running, timeout_s=120, what="frames counted while the long video's job runs")
    assert running["frames"]["total"] >= 60 * TRACK_FPS
    wait_until(lambda: all(j["state"] == "finished" for j in jobs()), timeout_s=300, what="every job to finish")
    # GET /jobs keeps the jobs with background work: the long video's, stored through Label Studio's API, each of
    # its sampled frames searched once (instants 0, 0.2, ... s of 60 s); the short video went back in an answer
    [finished] = [j for j in jobs() if j.get("frames", {}).get("total", 0) >= 60 * TRACK_FPS]
    assert (finished["tasks"]["stored"], finished["tasks"]["failed"]) == (1, 0)
    assert finished["frames"]["done"] == finished["frames"]["total"] == 300

    version = httpx.get(f"{service.url}/health").json()["model_version"]
    interface = LabelInterface(VIDEO_CONFIG)
    for name, (task_id, seconds) in tasks.items():
        [prediction] = client.predictions.list(task=task_id)
        assert prediction.model_version == version
        regions = prediction.result
        assert regions and interface.validate_prediction({"result": regions}), name
        for region in regions:
            assert (region["type"], region["from_name"], region["to_name"]) == ("videorectangle", "box", "video")
            assert region["value"]["labels"][0] in ("red", "blue")
            sequence = region["value"]["sequence"]
            assert [k["frame"] for k in sequence] == sorted({k["frame"] for k in sequence})
            assert sequence[-1]["enabled"] is False and 1 <= sequence[0]["frame"] <= seconds * 25
        assert region["value"]["framesCount"] == round(seconds * 25)  # the config's framerate, not the file's


@pytest.fixture(scope="module")
def tracking_service(label_studio, run, tmp_path_factory):
    """A second service, with a video tracker (the tiny SAM 2.1 video model), for the editor's "track this box"."""
    from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family
    from serve_app.tiny_models.null import make_null_models

    models = tmp_path_factory.mktemp("tracking-models")
    env = {"DETECTOR_MODEL": str(make_null_models(models / "null", boxes=1)["null_detector"]),
           "TRACKER_MODEL": str(make_tiny_sam_family(models / "sam2.1-video", "sam2_video")),
           "VIDEO_TRACK_FPS": str(TRACK_FPS), "VIDEO_BOX_TRACK_S": "1", "LABEL_STUDIO_URL": label_studio.url,
           "LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
    service = ServeProcess(env, tmp_path_factory.mktemp("serve-tracking")).start()
    yield service
    service.stop()


def test_a_box_drawn_in_the_editor_comes_back_tracked_as_that_region(run, tracking_service):
    """The call the editor makes with Auto-Annotation on (Label Studio's interactive endpoint) with a box drawn on
    frame 26 of the short video: the answer is that region, same id, tracked 1 s back and 1 s ahead."""
    client, project, _, tasks = run
    ml = client.ml.create(project=project.id, url=tracking_service.url, is_interactive=True, title="tracker")
    task_id = tasks["short"][0]
    drawn = {"id": "Yq3x_Ab12", "type": "videorectangle", "from_name": "box", "to_name": "video", "origin": "manual",
             "value": {"framesCount": 50, "duration": 2.0, "labels": ["red"],
                       "sequence": [{"frame": 26, "time": 1.0, "enabled": True, "rotation": 0,
                                     "x": 21.9, "y": 20.8, "width": 12.5, "height": 16.7}]}}
    response = client.ml.with_raw_response.predict_interactive(ml.id, task=task_id, context={"result": [drawn]})
    body = response.response.json()
    assert "errors" not in body, body
    [region] = body["data"]["result"]
    assert (region["id"], region["type"], region["value"]["labels"]) == ("Yq3x_Ab12", "videorectangle", ["red"])
    frames = [k["frame"] for k in region["value"]["sequence"]]
    assert frames[0] <= 26 <= frames[-1] and frames[-1] <= 51  # within 1 s each way of the drawn frame
    assert LabelInterface(VIDEO_CONFIG).validate_prediction({"result": [region]})
    assert len(client.predictions.list(task=task_id)) == 1  # interactive answers are not stored
