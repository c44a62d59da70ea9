"""The other model families through the real service over HTTP: an OWLv2 detector and a transformers SAM 2.1
segmenter (saved as the hub saves it, `sam2_video`) answer Label Studio's captured bodies with valid results,
and a click after a text prompt on the same image reuses the image's embedding. The same SAM 2.1 checkpoint is
the Tracker of video tasks (`detect+track`), whose tracks equal the in-process pipeline's."""

from __future__ import annotations

import httpx
import pytest

from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family
from serve_app.tiny_models.owlv2_omdet import make_tiny_owlv2
from tests.imaging import pattern, png_bytes
from tests.serve_process import ServeProcess
from tests.service_checks import click_after_text_is_a_cache_hit, post, retrieve_is_valid

pytestmark = pytest.mark.serve

SIZES = {"fam-a.png": (320, 240), "fam-b.png": (200, 300)}  # width, height


@pytest.fixture(scope="module")
def service(image_dir, tmp_path_factory):
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        (image_dir / name).write_bytes(png_bytes(pattern(height, width, seed=40 + seed)))
    sam2 = make_tiny_sam_family(tmp_path_factory.mktemp("sam2.1-tiny"), "sam2_video", seed=2)
    owlv2 = make_tiny_owlv2(tmp_path_factory.mktemp("owlv2-tiny"), seed=2)
    # COMPILE_ENCODERS: the segmenter's encoder compiled inside a real replica, and every answer below through it
    env = {"DETECTOR_MODEL": str(owlv2), "SEGMENTER_MODEL": str(sam2), "TRACKER_MODEL": str(sam2),
           "COMPILE_ENCODERS": "on", "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    process.models = {"owlv2": owlv2, "sam2": sam2}
    yield process
    process.stop()


def test_retrieve_predictions_gives_valid_boxes_and_masks(service, image_server):
    payload = retrieve_is_valid(service, [(f"{image_server}/{name}", size) for name, size in SIZES.items()], 5)
    # the models' directories name it; the tracker too, as it decides video tracks
    owlv2, sam2 = service.models["owlv2"].name, service.models["sam2"].name  # pytest numbers them: owlv2-tiny0 ...
    assert payload["model_version"] == f"grounded-serve:{owlv2}+{sam2}+track:{sam2}"
    assert sam2.startswith("sam2.1-tiny")


def test_a_click_after_a_text_prompt_on_the_same_image_reuses_its_embedding(service, image_server):
    click_after_text_is_a_cache_hit(service, f"{image_server}/fam-b.png", SIZES["fam-b.png"])


def test_the_segmenter_replica_compiled_its_encoder_before_serving(service):
    log = service.log_path.read_text(errors="replace")
    assert "SAM 2 / 2.1 image encoder: compiled (torch.compile mode default)" in log
    assert "torch.compile failed" not in log


def test_video_tasks_are_tracked_by_the_tracker_deployment_as_in_process(service, image_dir, image_server):
    """Two videos in one Retrieve: each is one session on the Tracker (its frames routed to one replica), the
    frames of both batch in the Detector, and the tracks equal the in-process pipeline's with the same models."""
    import asyncio

    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
    from serve_app.ingress.pipeline import LabellingPipeline, in_thread
    from serve_app.models import catalog
    from serve_app.models.loading import load
    from serve_app.models.spec import ModelSpec
    from serve_app.models.tracker_sessions import TrackerSessions
    from serve_app.settings import Settings
    from tests.test_video_tracks import CROSSING, VIDEO_CONFIG
    from tests.videos import Square, encode

    videos = {"track-a.mp4": encode(CROSSING, seconds=2),
              "track-b.mp4": encode([Square("blue", 50, (0, 0), (40, 30))], seconds=2)}
    for name, data in videos.items():
        (image_dir / name).write_bytes(data)
    tasks = [{"id": 700 + i, "data": {"video": f"{image_server}/{name}"}} for i, name in enumerate(videos)]
    body = {"tasks": tasks, "label_config": VIDEO_CONFIG, "project": "8.1"}
    payload = post(service, body)
    assert "task_errors" not in payload

    settings = Settings.load(env={"DEVICE": "cpu", "VIDEO_TRACK_FPS": "2", "BOX_THRESHOLD": "0",
                                  "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"})
    detector = load(ModelSpec(catalog.DETECTOR, str(service.models["owlv2"]), device="cpu"))
    tracker = load(ModelSpec(catalog.TRACKER, str(service.models["sam2"]), "TRACKER_MODEL", device="cpu"))
    sessions = TrackerSessions(tracker)
    local = LabellingPipeline(settings=settings, model_version="v", detect=in_thread(detector.detect), segment=None,
                              fetcher=ImageFetcher(ImageSourcePolicy(max_bytes=10**8, timeout_s=5, max_pixels=10**8,
                                                                     host_allowlist=frozenset({"127.0.0.1"}))),
                              track=lambda step: asyncio.to_thread(sessions.step, step))
    expected = asyncio.run(local.predict(body))["results"]

    def tracks(prediction):
        return sorted((r["value"]["labels"][0], [(k["frame"], k["enabled"], k["x"], k["y"], k["width"], k["height"])
                                                 for k in r["value"]["sequence"]]) for r in prediction["result"])

    for served, computed in zip(payload["results"], expected, strict=True):
        assert served["result"], "the tracker found nothing to track"
        for (label, got), (label_expected, want) in zip(tracks(served), tracks(computed), strict=True):
            assert label == label_expected and len(got) == len(want)
            for a, b in zip(got, want):
                assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], abs=1e-3)
    assert len(sessions) == 0
    assert httpx.get(f"{service.url}/health", timeout=5).json()["models_ready"]["tracker"] is True
