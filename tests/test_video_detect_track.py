"""`detect+track` on videos through the labelling pipeline, in-process: the detector's boxes start objects, a video
tracker carries them (serve_app.models.tracker_sessions). A colour tracker stands in for trained weights
(tests/videos.py) to check what the tracks say; the tiny random-weight SAM 2.1 video model checks the real one runs
the same path."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serve_app.ingress.pipeline import in_thread
from serve_app.models import catalog
from serve_app.models.loading import load
from serve_app.models.messages import TrackerUnavailable, TrackStep
from serve_app.models.spec import ModelSpec
from serve_app.models.tracker_sessions import TrackerSessions
from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family
from tests.test_video_tracks import CROSSING, data_url, pipeline_with, predict
from tests.videos import ColourDetector, ColourTracker, encode


def tracking_pipeline(detector, tracker, **settings):
    pipeline = pipeline_with(detector, **settings)
    sessions = TrackerSessions(tracker, max_sessions=2)
    pipeline.track = lambda step: asyncio.to_thread(sessions.step, step)
    return pipeline, sessions


@pytest.fixture(scope="module")
def crossing_video():
    return encode(CROSSING, seconds=5)


def test_the_tracker_carries_each_detected_object_as_one_track(crossing_video):
    pipeline, sessions = tracking_pipeline(ColourDetector(), ColourTracker(), video_track_fps=5)
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert "task_errors" not in response
    regions = response["results"][0]["result"]
    assert sorted(r["value"]["labels"][0] for r in regions) == ["blue", "red", "red"]
    by_start = {(r["value"]["labels"][0], r["value"]["sequence"][0]["frame"]): r for r in regions}
    moving_red, blue, entering_red = by_start[("red", 1)], by_start[("blue", 1)], by_start[("red", 26)]
    for region, square in ((moving_red, CROSSING[0]), (blue, CROSSING[1]), (entering_red, CROSSING[2])):
        for key in region["value"]["sequence"]:
            x0, y0, _, _ = square.box_at((key["frame"] - 1) / 25)
            assert key["x"] == pytest.approx(100 * x0 / 320, abs=1.0)
            assert key["y"] == pytest.approx(100 * y0 / 240, abs=1.0)
    assert (blue["value"]["sequence"][-1]["frame"], blue["value"]["sequence"][-1]["enabled"]) == (71, False)
    assert len(sessions) == 0  # the video's session was closed when it ended


def test_a_failing_video_closes_its_session_and_fails_alone(crossing_video):
    class Failing(ColourDetector):
        def detect(self, requests):
            if self.calls >= 3:
                raise RuntimeError("the detector broke")
            return super().detect(requests)

    pipeline, sessions = tracking_pipeline(Failing(), ColourTracker(), video_track_fps=5)
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert response["task_errors"][0]["error"].startswith("internal error")
    assert len(sessions) == 0


def test_a_step_for_a_session_the_replica_lost_is_refused_not_restarted():
    sessions = TrackerSessions(ColourTracker(), max_sessions=1)
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TrackerUnavailable, match="restarted or dropped it"):
        sessions.step(TrackStep(image_key="a", frame=5, image=image))
    sessions.step(TrackStep(image_key="a", frame=0, image=image))
    with pytest.raises(TrackerUnavailable, match="after frame 0"):
        sessions.step(TrackStep(image_key="a", frame=2, image=image))
    with pytest.raises(TrackerUnavailable, match="TRACKER_MAX_SESSIONS"):
        sessions.step(TrackStep(image_key="b", frame=0, image=image))


def test_an_idle_session_makes_room_for_a_new_video():
    now = [0.0]
    sessions = TrackerSessions(ColourTracker(), max_sessions=1, idle_s=60, clock=lambda: now[0])
    image = np.zeros((8, 8, 3), np.uint8)
    sessions.step(TrackStep(image_key="a", frame=0, image=image))
    now[0] = 61.0
    sessions.step(TrackStep(image_key="b", frame=0, image=image))
    assert len(sessions) == 1
    with pytest.raises(TrackerUnavailable, match="restarted or dropped"):
        sessions.step(TrackStep(image_key="a", frame=1, image=image))


def test_the_tiny_sam2_video_model_tracks_through_the_pipeline(tmp_path, crossing_video):
    directory = make_tiny_sam_family(tmp_path / "sam2_video", "sam2_video")
    tracker = load(ModelSpec(catalog.TRACKER, str(directory), "TRACKER_MODEL", device="cpu"))
    pipeline, sessions = tracking_pipeline(ColourDetector(), tracker, video_track_fps=2)
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert "task_errors" not in response
    regions = response["results"][0]["result"]
    assert regions and all(r["type"] == "videorectangle" for r in regions)
    assert len(sessions) == 0


def test_a_tracker_model_that_is_not_a_video_model_fails_the_plan():
    from serve_app.graph_plan import plan_graph
    from serve_app.settings import Settings, SettingsError

    types = {"dino": "grounding-dino", "sam2": "sam2", "video": "sam2_video"}
    plan = plan_graph(Settings.load(env={"DETECTOR_MODEL": "dino", "TRACKER_MODEL": "video"}), types.get)
    assert plan.video_pipeline == "detect+track" and plan.tracker.checkpoint == "video"
    assert plan.model_version.endswith("+track:video")
    with pytest.raises(SettingsError, match="TRACKER_MODEL='sam2' is a 'sam2' checkpoint; it must be a video model"):
        plan_graph(Settings.load(env={"DETECTOR_MODEL": "dino", "TRACKER_MODEL": "sam2"}), types.get)
    assert plan_graph(Settings.load(env={"DETECTOR_MODEL": "dino"}), types.get).video_pipeline == "detect+link"
