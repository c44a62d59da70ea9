"""Video tasks through the labelling pipeline, in-process: real files, real decoding, ByteTrack linking and
Label Studio's keyframe format, with a colour detector standing in for trained weights (tests/videos.py) and the
tiny random-weight Grounding DINO for the real architecture."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_sdk.label_interface import LabelInterface

from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.keyframes import editor_frame, essential, track_sequence
from serve_app.ingress.label_config import parse_label_config
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.ingress.tracks import Track, TrackPoint
from serve_app.settings import Settings
from tests.videos import ColourDetector, Square, encode

VIDEO_CONFIG = """<View>
  <Labels name="videoLabels" toName="video" allowEmpty="true">
    <Label value="red" background="red"/>
    <Label value="blue" background="blue"/>
  </Labels>
  <Video name="video" value="$video" framerate="25.0"/>
  <VideoRectangle name="box" toName="video"/>
  <TextArea name="prompt" toName="video" editable="true"/>
</View>"""

# two squares that cross at t = 2 s; the blue one leaves at 3 s and a third (red) enters at 1 s
CROSSING = [Square("red", 40, (10, 50), (60, 0)), Square("blue", 40, (270, 60), (-60, 0), shown=(0, 3)),
            Square("red", 30, (150, 180), (0, -20), shown=(1, 1e9))]


def data_url(video: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(video).decode()


def pipeline_with(detector, **settings) -> LabellingPipeline:
    s = Settings.load(env={"DEVICE": "cpu", **{k.upper(): str(v) for k, v in settings.items()}})
    policy = ImageSourcePolicy(max_bytes=s.max_download_bytes, timeout_s=5, max_pixels=10**8)
    return LabellingPipeline(settings=s, model_version="v-video", detect=in_thread(detector.detect), segment=None,
                             fetcher=ImageFetcher(policy))


def predict(pipeline, tasks, context=None) -> dict:
    body = {"tasks": tasks, "label_config": VIDEO_CONFIG, "project": "1.1"}
    if context is not None:
        body["params"] = {"context": context}
    return asyncio.run(pipeline.predict(body))


# -- keyframes ------------------------------------------------------------------------------------------------


def test_the_editor_numbers_frames_from_one_by_the_config_framerate():
    assert [editor_frame(t, 25) for t in (0, 0.04, 0.2, 1.0)] == [1, 2, 6, 26]
    assert editor_frame(1.0, 24) == 25


def test_a_straight_track_is_two_keyframes_and_a_turn_adds_one():
    frames = np.arange(1, 101, dtype=float)
    straight = np.stack([frames * 0.5, frames * 0.1, np.full(100, 10.0), np.full(100, 12.0)], axis=1)
    assert list(essential(frames, straight, 0.5)) == [0, 99]
    turned = straight.copy()
    turned[50:, 1] = turned[50, 1] + (frames[50:] - frames[50]) * 0.8  # heads down from frame 51
    kept = essential(frames, turned, 0.5)
    assert list(kept) == [0, 50, 99]
    # every dropped point is within the tolerance of the line between kept ones, as the editor interpolates
    for coordinate in range(4):
        drawn = np.interp(frames, frames[kept], turned[kept, coordinate])
        assert np.abs(drawn - turned[:, coordinate]).max() <= 0.5


def test_a_track_ends_and_hides_through_a_gap_with_enabled_false():
    points = [TrackPoint(n, n / 5, (10.0 + n, 20.0, 50.0 + n, 60.0), 0.9) for n in [*range(0, 5), *range(9, 12)]]
    sequence = track_sequence(Track("red", points), width=100, height=100, framerate=25, tolerance=0.5)
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (21, False), (46, True), (56, False)]
    assert all(k["rotation"] == 0 and isinstance(k["x"], float) for k in sequence)
    assert sequence[0]["x"] == pytest.approx(10.0) and sequence[-1]["x"] == pytest.approx(21.0)
    assert [k["frame"] for k in sequence] == sorted(k["frame"] for k in sequence)  # the editor never sorts them


def test_a_one_frame_miss_is_interpolated_not_hidden():
    points = [TrackPoint(n, n / 5, (10.0, 20.0, 50.0, 60.0), 0.9) for n in (0, 1, 3, 4)]
    sequence = track_sequence(Track("red", points), width=100, height=100, framerate=25, tolerance=0.5,
                              sample_step=2)
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (21, False)]


# -- the pipeline ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crossing_video():
    return encode(CROSSING, seconds=5)


def test_retrieve_tracks_every_object_of_every_label(crossing_video):
    detector = ColourDetector()
    response = predict(pipeline_with(detector, video_track_fps=5), [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert "task_errors" not in response and response["model_version"] == "v-video"
    [prediction] = response["results"]
    regions = prediction["result"]
    assert sorted(r["value"]["labels"][0] for r in regions) == ["blue", "red", "red"]
    interface = LabelInterface(VIDEO_CONFIG)
    assert interface.validate_prediction({"result": regions, "score": prediction["score"]}) is True
    for region in regions:
        assert (region["from_name"], region["to_name"], region["type"]) == ("box", "video", "videorectangle")
        assert region["value"]["framesCount"] == 125 and region["value"]["duration"] == pytest.approx(5.0, abs=0.05)
    assert len({r["id"] for r in regions}) == 3  # the editor merges regions that share an id

    # each track follows its own square through the crossing: its boxes are where that square was
    by_start = {(r["value"]["labels"][0], r["value"]["sequence"][0]["frame"]): r for r in regions}
    moving_red, blue, entering_red = by_start[("red", 1)], by_start[("blue", 1)], by_start[("red", 26)]
    for region, square in ((moving_red, CROSSING[0]), (blue, CROSSING[1]), (entering_red, CROSSING[2])):
        for key in region["value"]["sequence"]:
            x0, y0, x1, _ = square.box_at((key["frame"] - 1) / 25)
            x1 = min(x1, 320)  # leaving the frame on the right
            assert key["x"] == pytest.approx(100 * x0 / 320, abs=1.0)
            assert key["y"] == pytest.approx(100 * y0 / 240, abs=1.0)
            assert key["width"] == pytest.approx(100 * (x1 - x0) / 320, abs=1.0)
    # linear motion is a handful of keyframes, not one per sampled frame (25 samples each): the start, and
    # where it leaves the frame on the right (its box shrinks)
    assert len(moving_red["value"]["sequence"]) <= 5 and len(entering_red["value"]["sequence"]) == 2
    # the blue square leaves at 3 s: its track is hidden after its last sighting (t = 2.8 s, frame 71)
    assert (blue["value"]["sequence"][-1]["frame"], blue["value"]["sequence"][-1]["enabled"]) == (71, False)
    assert moving_red["value"]["sequence"][-1]["enabled"] is False  # ends with the video, not held beyond it


def test_a_typed_prompt_tracks_only_the_phrases_it_names(crossing_video):
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "video", "value": {"text": ["blue"]}}]}
    response = predict(pipeline_with(ColourDetector(), video_track_fps=5),
                       [{"id": 1, "data": {"video": data_url(crossing_video)}}], context)
    assert [r["value"]["labels"] for r in response["results"][0]["result"]] == [["blue"]]


def test_frames_at_the_detector_are_bounded(crossing_video):
    detector = ColourDetector()
    in_flight, most = 0, 0
    detect = in_thread(detector.detect)

    async def counted(request):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await detect(request)
        finally:
            in_flight -= 1

    pipeline = pipeline_with(detector, video_track_fps=25, video_frames_in_flight=3)
    pipeline.detect = counted
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert len(response["results"][0]["result"]) == 3
    assert detector.calls == 125 and most == 3  # every frame searched, never more than 3 waiting


def test_a_bad_video_fails_alone_and_says_why(crossing_video):
    tasks = [{"id": 1, "data": {"video": data_url(crossing_video)}},
             {"id": 2, "data": {"video": "data:video/mp4;base64," + base64.b64encode(b"not a video" * 50).decode()}},
             {"id": 3, "data": {"image": "no video key"}}]
    response = predict(pipeline_with(ColourDetector(), video_track_fps=5), tasks)
    assert len(response["results"][0]["result"]) == 3
    assert response["results"][1] == [] and response["results"][2] == []
    errors = {e["task"]: e["error"] for e in response["task_errors"]}
    assert "not a decodable video" in errors[2] and "'video' key" in errors[3]


def test_the_config_framerate_decides_frame_numbers(crossing_video):
    config = VIDEO_CONFIG.replace('framerate="25.0"', 'framerate="$fps"')
    body = {"tasks": [{"id": 1, "data": {"video": data_url(crossing_video), "fps": 10}}], "label_config": config}
    pipeline = pipeline_with(ColourDetector(), video_track_fps=5)
    [prediction] = asyncio.run(pipeline.predict(body))["results"]
    blue = next(r for r in prediction["result"] if r["value"]["labels"] == ["blue"])
    assert blue["value"]["framesCount"] == 50
    assert (blue["value"]["sequence"][-1]["frame"]) == 29  # t = 2.8 s at 10 fps: frame 29
    assert parse_label_config(config).video.framerate_key == "fps"


def test_the_tiny_grounding_dino_runs_on_every_sampled_frame(tiny_models, crossing_video):
    from serve_app.models.grounding_dino import GroundingDinoDetector

    detector = GroundingDinoDetector.load(str(tiny_models["grounding_dino"]), device="cpu")
    counting = ColourDetector()
    counting.detect = lambda requests: (setattr(counting, "calls", counting.calls + 1), detector.detect(requests))[1]
    pipeline = pipeline_with(counting, video_track_fps=2, box_threshold=0.0, text_threshold=0.0)
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}])
    assert "task_errors" not in response and counting.calls == 10
    regions = response["results"][0]["result"]
    assert regions and LabelInterface(VIDEO_CONFIG).validate_prediction({"result": regions}) is True


def test_an_object_missed_for_a_second_keeps_its_track_and_is_hidden_meanwhile():
    from serve_app.ingress.tracks import TrackLinker

    linker = TrackLinker(("red",), track_fps=5, box_threshold=0.3)
    for n in [*range(0, 5), *range(10, 15)]:  # not found at 1.0-1.8 s
        linker.add(n, n / 5, np.array([[10.0 + n, 10, 50 + n, 50]]), np.array([0.9]), ["red"])
        if n == 4:
            for gap in range(5, 10):
                linker.add(gap, gap / 5, np.zeros((0, 4)), np.zeros(0), [])
    [track] = linker.tracks()
    assert [p.number for p in track.points] == [*range(0, 5), *range(10, 15)]
    sequence = track_sequence(track, width=100, height=100, framerate=25, tolerance=0.5, sample_step=2)
    assert [(k["frame"], k["enabled"]) for k in sequence] == [(1, True), (21, False), (51, True), (71, False)]


@pytest.mark.parametrize("attribute,rate", [('framerate="25.0"', 25.0), ("", 24.0), ('framerate=""', 24.0),
                                            ('framerate="abc"', 24.0), ('framerate="0.04"', 25.0),
                                            ('framerate="1e999"', 24.0), ('framerate="29.97"', 29.97)])
def test_the_framerate_is_read_as_the_editor_reads_it(attribute, rate):
    config = parse_label_config(VIDEO_CONFIG.replace('framerate="25.0"', attribute))
    assert config.video.framerate == pytest.approx(rate)
    assert config.labels == ("red", "blue") and config.image_key == "video" and config.boxes.name == "box"


@pytest.mark.parametrize("xml,message", [
    ('<View><Video name="v" value="$v"/><Labels name="l" toName="v"><Label value="a"/></Labels></View>',
     "no <VideoRectangle>"),
    ('<View><Video name="v" value="$v"/><VideoRectangle name="b" toName="v"/></View>', "no <Labels>"),
    (VIDEO_CONFIG.replace('framerate="25.0"', 'framerate="-5"'), "not a frame rate"),
])
def test_a_video_config_it_cannot_serve_is_a_clear_400(xml, message):
    from serve_app.ingress.errors import BadRequest

    with pytest.raises(BadRequest, match=message):
        parse_label_config(xml)


def test_a_download_that_stalls_fails_that_task_alone(crossing_video):
    import http.server
    import threading

    from tests.loopback import loopback_http

    release = threading.Event()

    class Stalling(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", str(len(crossing_video)))
            self.end_headers()
            if self.path == "/stalls.mp4":
                self.wfile.write(crossing_video[: len(crossing_video) // 2])
                self.wfile.flush()
                release.wait(60)  # then nothing more: the client's read timeout decides
                return
            self.wfile.write(crossing_video)

        def log_message(self, *args):
            pass

    with loopback_http(Stalling) as url:
        try:
            s = Settings.load(env={"DEVICE": "cpu", "VIDEO_TRACK_FPS": "5"})
            policy = ImageSourcePolicy(max_bytes=s.max_download_bytes, timeout_s=5, max_pixels=10**8,
                                       host_allowlist=frozenset({"127.0.0.1"}))
            pipeline = LabellingPipeline(settings=s, model_version="v", detect=in_thread(ColourDetector().detect),
                                         segment=None, fetcher=ImageFetcher(policy))
            response = predict(pipeline, [{"id": 1, "data": {"video": f"{url}/stalls.mp4"}},
                                          {"id": 2, "data": {"video": f"{url}/fine.mp4"}}])
        finally:
            release.set()
    assert response["results"][0] == [] and len(response["results"][1]["result"]) == 3
    [error] = response["task_errors"]
    assert error["task"] == 1 and "cannot download" in error["error"] and "Timeout" in error["error"]


def test_a_cancelled_video_task_stops_searching_and_gives_its_memory_back(crossing_video):
    detector = ColourDetector()
    pipeline = pipeline_with(detector, video_track_fps=25, video_frames_in_flight=4)
    searched = asyncio.Event()
    detect = pipeline.detect

    async def counted(request):
        if detector.calls >= 10:
            searched.set()
        return await detect(request)

    pipeline.detect = counted

    async def scenario():
        running = asyncio.ensure_future(pipeline.predict({
            "tasks": [{"id": 1, "data": {"video": data_url(crossing_video)}}], "label_config": VIDEO_CONFIG}))
        await searched.wait()
        running.cancel()  # as DELETE /jobs/{id} cancels a job's runners
        with pytest.raises(asyncio.CancelledError):
            await running
        return detector.calls

    calls = asyncio.run(scenario())  # the loop closes after cancelling anything left: nothing was left
    assert calls < 125 and detector.calls == calls  # no frame searched after the cancellation
    assert pipeline.memory.used == 0  # its frames' share of INGRESS_IMAGE_MEMORY_BYTES is back


def editor_shows(sequence: list[dict], frame: int) -> tuple[float, float, float, float] | None:
    """What Label Studio 1.23's editor draws at `frame` for a track's keyframes (VideoRectangleRegion.getShape with
    VideoRegion.isInLifespan, web/libs/editor): None when hidden."""
    before = [k for k in sequence if k["frame"] <= frame]
    if not before:
        return None
    last = before[-1]
    if not (last["enabled"] or last["frame"] == frame):
        return None
    after = [k for k in sequence if k["frame"] > frame]
    if last["frame"] == frame or not after:
        return last["x"], last["y"], last["width"], last["height"]
    nxt = after[0]
    r = (frame - last["frame"]) / (nxt["frame"] - last["frame"])
    return tuple(last[p] + (nxt[p] - last[p]) * r for p in ("x", "y", "width", "height"))


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.booleans()), min_size=1, max_size=60),
       tolerance=st.sampled_from([0.0, 0.5, 2.0]), track_fps=st.sampled_from([2.0, 5.0, 25.0]))
def test_the_editor_redraws_every_sighting_within_the_tolerance_and_hides_every_absence(steps, tolerance, track_fps):
    points, x, y = [], 40.0, 40.0
    for number, (dx, dy, seen) in enumerate(steps):
        x, y = min(80.0, max(0.0, x + dx)), min(80.0, max(0.0, y + dy))
        if seen or number == 0:
            points.append(TrackPoint(number, number / track_fps, (x, y, x + 10.0, y + 12.0), 0.9))
    sequence = track_sequence(Track("red", points), width=100, height=100, framerate=25, tolerance=tolerance,
                              sample_step=2)
    frames = [k["frame"] for k in sequence]
    assert frames == sorted(set(frames)) and sequence[-1]["enabled"] is False
    seen = {p.number: p for p in points}
    for number in range(points[-1].number + 1):
        frame = editor_frame(number / track_fps, 25)
        shown = editor_shows(sequence, frame)
        if number in seen:  # every sighting is drawn where it was, within the tolerance
            x0, y0, x1, y1 = seen[number].box
            assert shown is not None
            assert max(abs(a - b) for a, b in zip(shown, (x0, y0, x1 - x0, y1 - y0))) <= tolerance + 1e-6
        elif number - 1 not in seen or number + 1 not in seen:  # absent for two samples or more: hidden
            assert shown is None


def test_the_editors_own_request_on_a_long_video_stops_at_the_task_timeout_and_says_what_to_do(crossing_video):
    detector = ColourDetector()
    slow_enough = asyncio.Event()  # never set: each frame's detection waits until the task's timeout ends it

    async def waits(request):
        await slow_enough.wait()

    pipeline = pipeline_with(detector, task_timeout_s=0.5, video_track_fps=5)
    pipeline.detect = waits
    context = {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "video", "value": {"text": ["red"]}}]}
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(crossing_video)}}], context)
    [error] = response["task_errors"]
    assert "TASK_TIMEOUT_S" in error["error"] and "Retrieve predictions" in error["error"]
    assert pipeline.memory.used == 0


def test_videos_beyond_the_concurrency_wait_their_turn():
    red = encode([Square("red", 40, (10, 50), (60, 0))], seconds=2)
    blue = encode([Square("blue", 40, (270, 60), (-60, 0))], seconds=2)
    detector = ColourDetector()
    order: list[str] = []
    detect = in_thread(detector.detect)

    async def noted(request):
        found = await detect(request)
        order.append(request.phrases[int(found.phrase_ids[0])] if len(found) else "-")
        return found

    pipeline = pipeline_with(detector, video_track_fps=5, video_task_concurrency=1)
    pipeline.detect = noted
    response = predict(pipeline, [{"id": 1, "data": {"video": data_url(red)}},
                                  {"id": 2, "data": {"video": data_url(blue)}}])
    assert [len(p["result"]) for p in response["results"]] == [1, 1]
    # one video at a time (its file on disk, its decoder): every frame of the first before any of the second
    assert order == ["red"] * 10 + ["blue"] * 10
