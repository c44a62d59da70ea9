"""The video tracker (serve_app.models.video_tracker) against transformers' own streaming inference: tiny
random-weight SAM 2.1, EdgeTAM and SAM 3 tracker video models built from configs and loaded back through the
catalog, real frames
of moving shapes. The service's session forgets what the model never reads again and drops objects lost for good;
its masks must still equal an unpruned transformers session's on the same frames and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.models import catalog
from serve_app.models.detect_and_track import DetectAndTrack, box_iou
from serve_app.models.loading import load
from serve_app.models.spec import ModelSpec
from serve_app.models.video_tracker import VideoTracker, mask_boxes
from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family

HEIGHT, WIDTH = 96, 128
FRAMES = 20  # past the 15 frames back the model reads: the pruned session must not have dropped what it reads
# frame -> {object id: box}: one object from the start, two more on frame 3
PROMPTS = {0: {1: (10, 20, 40, 50)}, 3: {2: (70, 40, 100, 70), 3: (20, 60, 50, 90)}}


def frame(index: int) -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    image[20:50, 10 + 2 * index:40 + 2 * index] = (220, 40, 40)
    image[40:70, 70 - index:100 - index] = (40, 40, 220)
    return image


@pytest.fixture(scope="module", params=["sam2_video", "edgetam_video", "sam3 tracker"])
def tracker(request, tmp_path_factory) -> VideoTracker:
    if request.param == "sam3 tracker":  # SAM 3's tracker alone, from the same sam3_video checkpoint (drawn boxes)
        from serve_app.models.sam3_video_tracker import Sam3VideoTracker
        from serve_app.tiny_models.sam3 import make_tiny_sam3_video

        directory = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-video"), width=128)
        sam3 = load(ModelSpec(catalog.TRACKER, str(directory), "TRACKER_MODEL", device="cpu"))
        assert isinstance(sam3, Sam3VideoTracker)
        return sam3.box_tracker()
    directory = make_tiny_sam_family(tmp_path_factory.mktemp(request.param), request.param)
    loaded = load(ModelSpec(catalog.TRACKER, str(directory), "TRACKER_MODEL", device="cpu"))
    assert isinstance(loaded, VideoTracker)
    return loaded


def transformers_masks(tracker: VideoTracker) -> list[dict[int, np.ndarray]]:
    """transformers' own streaming loop (its model card's), unpruned: per frame, object id -> mask."""
    processor, model = tracker.processor, tracker.model
    session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    masks = []
    for index in range(FRAMES):
        pixels = processor(images=frame(index), return_tensors="pt")["pixel_values"][0]
        if index in PROMPTS:
            ids = list(PROMPTS[index])
            processor.add_inputs_to_inference_session(
                session, frame_idx=index, obj_ids=ids, input_boxes=[[list(map(float, PROMPTS[index][i])) for i in ids]],
                original_size=(HEIGHT, WIDTH))
        with torch.inference_mode():
            output = model(inference_session=session, frame=pixels)
        found = processor.post_process_masks([output.pred_masks], original_sizes=[[HEIGHT, WIDTH]])[0][:, 0].numpy()
        masks.append(dict(zip(output.object_ids, found)))
    return masks


def service_masks(tracker: VideoTracker, drop: dict[int, list[int]] | None = None) -> list[dict[int, np.ndarray]]:
    session = tracker.open(HEIGHT, WIDTH)
    masks = []
    for index in range(FRAMES):
        tracked = session.track(frame(index), with_masks=True)
        if index in PROMPTS:
            ids = list(PROMPTS[index])
            tracked = session.add(ids, np.array([PROMPTS[index][i] for i in ids]), with_masks=True)
        masks.append(dict(zip(tracked.object_ids, tracked.masks)))
        assert np.array_equal(tracked.boxes, mask_boxes(tracked.masks)[0])
        for gone in (drop or {}).get(index, []):
            session.drop([gone])
    _assert_bounded(session)
    session.close()
    return masks


def _assert_bounded(session) -> None:
    state = session.session
    assert len(state.processed_frames) <= 1
    for outputs in state.output_dict_per_obj.values():
        assert len(outputs["non_cond_frame_outputs"]) <= session.tracker.history_frames + 1
        assert len(outputs["cond_frame_outputs"]) == 1
        past = [o for i, o in outputs["non_cond_frame_outputs"].items() if i < session.frame_index]
        assert past and all("high_res_masks" not in o and "pred_masks" not in o for o in past)


def test_tracks_equal_transformers_streaming_inference_with_the_session_kept_bounded(tracker):
    expected, got = transformers_masks(tracker), service_masks(tracker)
    assert [sorted(m) for m in got] == [sorted(m) for m in expected]
    assert any(mask.any() for masks in got for mask in masks.values())  # something to compare
    for index, (want, have) in enumerate(zip(expected, got)):
        for object_id in want:
            assert np.array_equal(want[object_id], have[object_id]), (index, object_id)


def test_an_object_dropped_mid_video_leaves_the_others_tracks_as_they_were(tracker):
    expected = transformers_masks(tracker)
    got = service_masks(tracker, drop={8: [2]})
    for index in range(FRAMES):
        assert sorted(got[index]) == ([1, 2, 3] if 3 <= index <= 8 else [1, 3] if index > 8 else [1])
        for object_id in got[index]:
            # the memory encoder runs every object in one batch: a batch of 2 may round differently from one of 3
            agreement = np.mean(expected[index][object_id] == got[index][object_id])
            assert agreement >= 0.999, (index, object_id, agreement)


def test_a_checkpoint_without_the_video_weights_cannot_track(tmp_path):
    from serve_app.models.errors import ModelLoadError

    directory = make_tiny_sam_family(tmp_path / "image-only", "sam2")
    with pytest.raises(ModelLoadError, match="TRACKER_MODEL=.*sam2.*SAM 2 / 2.1, not a tracker"):
        load(ModelSpec(catalog.TRACKER, str(directory), "TRACKER_MODEL", device="cpu"))


class ScriptedSession:
    """A tracker session whose objects stay where they started, or vanish when told: the association's rules,
    separate from any model."""

    def __init__(self):
        self.boxes: dict[int, np.ndarray] = {}
        self.hidden: set[int] = set()
        self.dropped: list[int] = []

    def _frame(self):
        from serve_app.models.video_tracker import FrameTracks

        ids = list(self.boxes)
        return FrameTracks(ids, np.array([self.boxes[i] for i in ids], np.float32).reshape(-1, 4),
                           np.array([i not in self.hidden for i in ids], bool))

    def track(self, image):
        return self._frame()

    def add(self, ids, boxes):
        self.boxes.update(zip(ids, np.asarray(boxes, np.float32)))
        return self._frame()

    def drop(self, ids):
        self.dropped += ids
        for i in ids:
            self.boxes.pop(i)


def test_detections_start_objects_match_live_ones_and_lost_ones_end():
    session = ScriptedSession()
    tracking = DetectAndTrack(session, match_iou=0.3, lost_after=2, max_objects=3)
    image = np.zeros((10, 10, 3), np.uint8)
    step = tracking.step(image, [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [0.9, 0.8])
    assert [(o.object_id, o.label, o.score) for o in step.objects] == [(1, 0, pytest.approx(0.9)),
                                                                        (2, 1, pytest.approx(0.8))]
    # the same places again: matched, no new object; a box of another label over object 1 is a new object
    step = tracking.step(image, [[1, 1, 11, 11], [0, 0, 10, 10]], [0, 1], [0.7, 0.6])
    assert [(o.object_id, o.score) for o in step.objects] == [(1, pytest.approx(0.7)), (2, pytest.approx(0.8)),
                                                              (3, pytest.approx(0.6))]
    # full: a fourth object is refused and counted, never silently lost
    step = tracking.step(image, [[80, 80, 90, 90]], [0], [0.9])
    assert step.refused == 1 and len(step.objects) == 3
    session.hidden = {2}
    assert tracking.step(image, [], [], []).ended == []
    assert tracking.step(image, [], [], []).ended == [2] and session.dropped == [2]


def test_two_objects_the_tracker_puts_on_one_thing_are_merged_into_the_older():
    session = ScriptedSession()
    tracking = DetectAndTrack(session, match_iou=0.9, merge_iou=0.7)
    image = np.zeros((10, 10, 3), np.uint8)
    tracking.step(image, [[0, 0, 10, 10]], [0], [0.9])
    step = tracking.step(image, [[0, 0, 10, 11]], [0], [0.9])  # IoU 0.91: the same object
    assert [o.object_id for o in step.objects] == [1]
    step = tracking.step(image, [[0, 0, 10, 12.5]], [0], [0.9])  # IoU 0.8: not matched, a new object, merged
    assert step.merged == {2: 1} and [o.object_id for o in step.objects] == [1] and session.dropped == [2]


def test_box_iou_of_disjoint_touching_and_empty_boxes():
    assert box_iou([[0, 0, 1, 1]], [[1, 0, 2, 1], [0, 0, 1, 1], [0, 0, 0, 0]]).tolist() == [[0.0, 1.0, 0.0]]


def test_tracking_back_in_time_as_a_reversed_stream_equals_transformers_reverse_propagation(tracker):
    """The editor's "track this box" goes back from the box's frame by streaming the earlier frames last first;
    transformers' own reverse propagation over the whole video (all frames in its session) gives the same masks.
    The box is on frame 18 of 20: with 16 or more frames both read the same number of object pointers."""
    processor, model = tracker.processor, tracker.model
    frames, start, box = [frame(i) for i in range(FRAMES)], FRAMES - 2, (20, 20, 60, 50)
    pixels = torch.stack([processor(images=f, return_tensors="pt")["pixel_values"][0] for f in frames])
    session_class = type(processor.init_video_session(inference_device="cpu", dtype=torch.float32))
    whole = session_class(video=pixels, video_height=HEIGHT, video_width=WIDTH, dtype=torch.float32)
    processor.add_inputs_to_inference_session(whole, frame_idx=start, obj_ids=[1], input_boxes=[[list(box)]])
    expected = {}
    with torch.inference_mode():
        for output in model.propagate_in_video_iterator(whole, start_frame_idx=start, reverse=True):
            masks = processor.post_process_masks([output.pred_masks], original_sizes=[[HEIGHT, WIDTH]])[0]
            expected[output.frame_idx] = masks[0, 0].numpy()
    session = tracker.open(HEIGHT, WIDTH)
    got = {}
    for step, index in enumerate(range(start, -1, -1)):
        tracked = session.track(frames[index], with_masks=True)
        if step == 0:
            tracked = session.add([1], np.array([box]), with_masks=True)
        got[index] = tracked.masks[0]
    assert sorted(got) == sorted(expected) == list(range(start + 1))
    for index in expected:
        assert np.array_equal(expected[index], got[index]), index
