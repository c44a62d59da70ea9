"""SAM 3's video model as the service streams it (serve_app.models.sam3_video_tracker) against transformers' own
streaming inference: a tiny random-weight `sam3_video` checkpoint (128 wide, so its tracker runs) loaded back
through the catalog, real frames of moving shapes, two phrases. The service's session forgets what streaming never
reads again; its objects, boxes and masks must equal an unpruned transformers session's frame by frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.models import catalog
from serve_app.models.loading import load
from serve_app.models.sam3_video_tracker import HISTORY_FRAMES, Sam3VideoTracker
from serve_app.models.spec import ModelSpec
from serve_app.tiny_models.sam3 import make_tiny_sam3_video

HEIGHT, WIDTH = 96, 128
FRAMES = 40  # past the 16 frames back the tracker reads, and two of its re-conditionings (every 16th frame)
PHRASES = ["red square", "blue square"]
MAX_OBJECTS = 6


def frame(index: int) -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), 30, np.uint8)
    image[20:50, 10 + 2 * index:40 + 2 * index] = (220, 40, 40)
    image[40:70, 70 - index:100 - index] = (40, 40, 220)
    return image


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> Sam3VideoTracker:
    directory = make_tiny_sam3_video(tmp_path_factory.mktemp("sam3-video"), width=128)
    loaded = load(ModelSpec(catalog.TRACKER, str(directory), "TRACKER_MODEL", device="cpu"))
    assert isinstance(loaded, Sam3VideoTracker)
    return loaded


def transformers_frames(tracker: Sam3VideoTracker) -> list[dict]:
    """transformers' streaming loop (its model card's), unpruned, with the same object cap."""
    processor, model = tracker.processor, tracker.model
    session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    processor.add_text_prompt(session, PHRASES)
    limit, model.max_num_objects = model.max_num_objects, MAX_OBJECTS
    answers = []
    try:
        for index in range(FRAMES):
            pixels = processor(images=frame(index), return_tensors="pt")["pixel_values"][0]
            with torch.inference_mode():
                output = model(inference_session=session, frame=pixels)
            answers.append(processor.postprocess_outputs(session, output, original_sizes=[[HEIGHT, WIDTH]]))
    finally:
        model.max_num_objects = limit
    return answers


def test_objects_equal_transformers_streaming_inference_with_the_session_kept_bounded(tracker):
    expected = transformers_frames(tracker)
    session = tracker.open(HEIGHT, WIDTH, PHRASES, lost_after=10**6, max_objects=MAX_OBJECTS)
    shown = 0
    for index, want in enumerate(expected):
        got = session.step(frame(index), with_masks=True)
        assert got.object_ids.tolist() == want["object_ids"].tolist(), index
        assert np.allclose(got.boxes, want["boxes"].numpy(), atol=1e-4), index
        assert np.array_equal(got.masks, want["masks"].numpy()), index
        assert got.phrase_ids.tolist() == [PHRASES.index(text) for obj in got.object_ids.tolist()
                                           for text, ids in want["prompt_to_obj_ids"].items() if obj in ids]
        shown += len(got.object_ids)
    assert shown, "nothing to compare: the tiny model showed no object"
    state = session.session
    assert sum(pixels is not None for pixels in state.processed_frames.values()) <= 1
    assert len(state.obj_id_to_tracker_score_frame_wise) <= 1 and not state.unmatched_frame_inds
    for outputs in state.output_dict_per_obj.values():
        assert len(outputs["non_cond_frame_outputs"]) <= HISTORY_FRAMES + 1
    session.close()


def test_objects_unseen_for_a_while_leave_the_session(tracker):
    session = tracker.open(HEIGHT, WIDTH, PHRASES, lost_after=2, max_objects=MAX_OBJECTS)
    blank = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    lives = [session.step(frame(i)).live for i in range(6)] + [session.step(blank).live for _ in range(6)]
    assert max(lives) <= MAX_OBJECTS
    assert all(obj in session._unseen for obj in session.object_ids)  # every live object is being watched
    session.close()


def test_a_checkpoint_of_another_family_cannot_be_the_sam3_tracker(tmp_path):
    from serve_app.models.errors import ModelLoadError
    from serve_app.tiny_models.sam3 import make_tiny_sam3

    with pytest.raises(ModelLoadError, match="TRACKER_MODEL=.*'sam3'"):
        load(ModelSpec(catalog.TRACKER, str(make_tiny_sam3(tmp_path / "image-only")), "TRACKER_MODEL",
                       device="cpu"))
