"""The concept pipeline through the real service over HTTP: SAM 3 (tiny, random weights, saved as the hub's
facebook/sam3 is, `sam3_video`) as DETECTOR_MODEL gives boxes and masks in one model for Label Studio's captured
bodies, and a click after a text prompt on the same image is answered from the features cached for the prompt."""

from __future__ import annotations

import copy

import httpx
import pytest

from serve_app.tiny_models.sam3 import make_tiny_sam3, make_tiny_sam3_video
from tests.configs import CLICK_CONFIG
from tests.conftest import load_ls_fixture
from tests.imaging import pattern, png_bytes
from tests.serve_process import ServeProcess
from tests.service_checks import click_after_text_is_a_cache_hit, post, retrieve_is_valid

pytestmark = pytest.mark.serve

SIZES = {"concept-a.png": (320, 240), "concept-b.png": (150, 260)}  # width, height


@pytest.fixture(scope="module")
def service(image_dir, tmp_path_factory):
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        (image_dir / name).write_bytes(png_bytes(pattern(height, width, seed=60 + seed)))
    sam3 = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-tiny"), seed=1)
    env = {"DETECTOR_MODEL": str(sam3), "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0",
           "EXEMPLAR_THRESHOLD": "0", "MAX_DETECTIONS": "4"}  # PIPELINE left at auto: SAM 3 means concept
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


def test_one_model_gives_boxes_and_masks_for_retrieve_predictions(service, image_server):
    health = httpx.get(f"{service.url}/health", timeout=5).json()
    assert health["models_ready"] == {"detector": True}  # no Segmenter deployment in this pipeline
    # MAX_DETECTIONS boxes across both labels' phrases, each with SAM 3's own mask
    retrieve_is_valid(service, [(f"{image_server}/{name}", size) for name, size in SIZES.items()], 4, 300)


def test_a_click_after_a_text_prompt_reuses_the_prompts_image_features(service, image_server):
    click_after_text_is_a_cache_hit(service, f"{image_server}/concept-b.png", SIZES["concept-b.png"])


@pytest.fixture(scope="module")
def detector_only_service(image_dir, tmp_path_factory):
    sam3 = make_tiny_sam3(tmp_path_factory.mktemp("sam3-detector-only"), seed=1)  # model_type "sam3": no tracker
    # videos: SAM 3's video model (a sam3_video checkpoint wide enough for its tracker) on the Tracker deployment
    video = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-video"), seed=2, width=128)
    env = {"DETECTOR_MODEL": str(sam3), "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0",
           "TRACKER_MODEL": str(video), "TRACKER_MAX_OBJECTS": "4", "VIDEO_TRACK_FPS": "4"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    process.video_model = video
    yield process
    process.stop()


def test_a_click_to_a_checkpoint_without_the_tracker_is_a_clear_task_error(detector_only_service, image_server):
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = f"{image_server}/concept-a.png"
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"]["result"] = [{
        "type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": True,
        "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["cats"]}}]
    answer = post(detector_only_service, body)
    assert answer["results"] == [[]]  # nothing Label Studio could store or show
    [error] = answer["task_errors"]
    assert "clicks and boxes need the interactive tracker" in error["error"] and "facebook/sam3" in error["error"]
    # the replica did not fail: text prompts are still answered, with SAM 3's own masks
    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = f"{image_server}/concept-a.png"
    regions = post(detector_only_service, body)["results"][0]["result"]
    assert {r["type"] for r in regions} == {"rectanglelabels", "brushlabels"}


def exemplar_body(image_url: str) -> dict:
    """An interactive /predict as Label Studio 1.23's editor sends it for two boxes drawn with the exemplar
    control: one "cats", one "cats" with NOT selected (docs/interactive.md)."""
    from tests.configs import EXEMPLAR_CONFIG, drawn_box

    body = copy.deepcopy(load_ls_fixture("predict_interactive.json")["body"])
    body["tasks"][0]["data"]["image"] = image_url
    body["label_config"] = EXEMPLAR_CONFIG
    body["params"]["context"]["result"] = [drawn_box(region_id, x, 10, 25, 40, labels, image_size=(320, 240))
                                           for region_id, x, labels in (("ex1", 10, ["cats"]),
                                                                        ("ex2", 60, ["cats", "NOT"]))]
    return body


def test_exemplar_boxes_find_instances_with_masks_encoded_by_the_replica(service, image_server):
    from label_studio_sdk.converter.brush import decode_rle

    answer = post(service, exemplar_body(f"{image_server}/concept-a.png"))
    result = answer["results"][0]["result"]
    rects = [r for r in result if r["type"] == "rectanglelabels"]
    brushes = [r for r in result if r["type"] == "brushlabels"]
    assert 0 < len(rects) == len(brushes) <= 4  # MAX_DETECTIONS
    assert {r["from_name"] for r in rects} == {"label"} and {r["value"]["rectanglelabels"][0] for r in rects} == {"cats"}
    width, height = SIZES["concept-a.png"]
    assert len(decode_rle(brushes[0]["value"]["rle"])) == width * height * 4


def test_video_tasks_are_tracked_with_the_concept_model_as_the_frames_detector(service, image_dir, image_server):
    """SAM 3 searches each sampled frame for the labels' concepts (boxes only come back from its replica, not
    masks Label Studio cannot show on video); ByteTrack links them into one videorectangle per object."""
    from label_studio_sdk.label_interface import LabelInterface

    from tests.test_video_tracks import CROSSING, VIDEO_CONFIG
    from tests.videos import encode

    (image_dir / "concept.mp4").write_bytes(encode(CROSSING, seconds=2))
    body = {"tasks": [{"id": 5, "data": {"video": f"{image_server}/concept.mp4"}}], "label_config": VIDEO_CONFIG}
    response = httpx.post(f"{service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    [prediction] = response.json()["results"]
    assert "task_errors" not in response.json() and prediction["result"]
    assert LabelInterface(VIDEO_CONFIG).validate_prediction(prediction) is True
    for region in prediction["result"]:
        assert region["type"] == "videorectangle" and region["value"]["labels"][0] in ("red", "blue")
        assert region["value"]["sequence"][-1]["enabled"] is False


def test_video_tasks_are_found_and_tracked_by_sam3s_video_model_as_in_process(detector_only_service, image_dir,
                                                                             image_server):
    """TRACKER_MODEL=SAM 3: the `concept` pipeline on videos. Each sampled frame goes to the Tracker only (SAM 3's
    video model detects the labels' phrases and tracks each instance with an identity), and the tracks equal the
    in-process pipeline's with the same checkpoint."""
    import asyncio

    from label_studio_sdk.label_interface import LabelInterface

    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
    from serve_app.ingress.pipeline import LabellingPipeline
    from serve_app.models import catalog
    from serve_app.models.loading import load
    from serve_app.models.spec import ModelSpec
    from serve_app.models.tracker_sessions import TrackerSessions
    from serve_app.settings import Settings
    from tests.test_video_tracks import CROSSING, VIDEO_CONFIG
    from tests.videos import encode

    (image_dir / "concept-tracked.mp4").write_bytes(encode(CROSSING, seconds=2))
    body = {"tasks": [{"id": 6, "data": {"video": f"{image_server}/concept-tracked.mp4"}}],
            "label_config": VIDEO_CONFIG}
    response = httpx.post(f"{detector_only_service.url}/predict", json=body, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    assert "task_errors" not in payload
    [prediction] = payload["results"]
    assert prediction["result"] and LabelInterface(VIDEO_CONFIG).validate_prediction(prediction) is True
    assert payload["model_version"].endswith("+track:" + detector_only_service.video_model.name)

    settings = Settings.load(env={"DEVICE": "cpu", "VIDEO_TRACK_FPS": "4", "BOX_THRESHOLD": "0"})
    sessions = TrackerSessions(load(ModelSpec(catalog.TRACKER, str(detector_only_service.video_model),
                                              "TRACKER_MODEL", device="cpu")), max_objects=4)

    async def no_detector(request):
        raise AssertionError("the concept pipeline sends video frames to the Tracker only")

    local = LabellingPipeline(settings=settings, model_version="v", detect=no_detector, segment=None,
                              fetcher=ImageFetcher(ImageSourcePolicy(max_bytes=10**8, timeout_s=5, max_pixels=10**8,
                                                                     host_allowlist=frozenset({"127.0.0.1"}))),
                              track=lambda step: asyncio.to_thread(sessions.step, step), track_detects=True)
    [expected] = asyncio.run(local.predict(body))["results"]

    def tracks(prediction):
        return sorted((r["value"]["labels"][0], [(k["frame"], k["enabled"], k["x"], k["y"], k["width"], k["height"])
                                                 for k in r["value"]["sequence"]]) for r in prediction["result"])

    for (label, got), (label_expected, want) in zip(tracks(prediction), tracks(expected), strict=True):
        assert label == label_expected and len(got) == len(want)
        for a, b in zip(got, want):
            assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-3)
    assert len(sessions) == 0
