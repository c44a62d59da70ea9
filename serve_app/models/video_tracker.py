"""Objects propagated through a video by a SAM 2-family video model (SAM 2.1, EdgeTAM, SAM 3's tracker), as
transformers streams it: one frame at a time, `processor.add_inputs_to_inference_session` for new objects and
`model(inference_session=, frame=)` for every frame.

Bounded whatever the video's length. A streaming session keeps every frame's pixels and every object's outputs
(a 1024 x 1024 float mask each); `forget_the_past` drops what the model never reads again. That is, per object:
- memory from the last `num_maskmem - 1` frames;
- object pointers from the last `max_object_pointers_in_encoder - 1` frames;
- its conditioning frames: the one where its box prompt was given (`max_cond_frame_num` -1 reads them all).
Objects lost for good are dropped from the session, so work per frame follows the objects on screen, not every
object ever seen. Nothing dropped is read by the model again: tests/test_video_tracker.py checks the tracks equal
an unpruned transformers session's on the same frames and prompts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from serve_app import get_logger
from serve_app.models.catalog import TRACKER, Family
from serve_app.models.device import autocast_for, effective_precision, pick_device
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.spec import ModelSpec

logger = get_logger(__name__)

# Outputs the model reads back from a past frame; the rest (masks at 256 and 1024 px) only matter on their own frame
_KEPT_OUTPUTS = ("maskmem_features", "maskmem_pos_enc", "object_pointer", "object_score_logits")


@dataclass
class FrameTracks:
    """Where the session's objects are on one frame."""

    object_ids: list[int] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # xyxy pixels, per object
    present: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))  # the model sees the object here
    masks: np.ndarray | None = None  # N x H x W bool, when asked for


def mask_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N x 4 xyxy pixel boxes around each mask's pixels, N present flags: the mask has any pixel)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    present = np.zeros(len(masks), bool)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            present[i] = True
    return boxes, present


def forget_object_history(session, now: int, oldest_read: int, max_conditioning: int = 0) -> None:
    """What a SAM 2-family tracker never reads again from its session (SAM 2.1, EdgeTAM, SAM 3's): each object's
    outputs older than `oldest_read` that were not prompted, the masks of every past frame, and past frames'
    inputs. `max_conditioning` > 0 also keeps an object's first conditioning frame and its latest ones only."""
    for outputs in session.output_dict_per_obj.values():
        past = outputs["non_cond_frame_outputs"]
        for index in [i for i in past if i < oldest_read]:
            del past[index]
        conditioning = outputs["cond_frame_outputs"]
        if max_conditioning and len(conditioning) > max_conditioning:
            ordered = sorted(conditioning)
            for index in ordered[1:len(ordered) - max_conditioning + 1]:
                del conditioning[index]
        for kind in ("non_cond_frame_outputs", "cond_frame_outputs"):
            for index, output in outputs[kind].items():
                if index < now:
                    for key in [k for k in output if k not in _KEPT_OUTPUTS]:
                        del output[key]
    for per_frame in (session.frames_tracked_per_obj, session.point_inputs_per_obj, session.mask_inputs_per_obj):
        for frames in per_frame.values():
            for index in [i for i in frames if i < now]:
                del frames[index]


class VideoTracker:
    """One video model; sessions (one per video) hold each video's state, and one forward runs at a time."""

    def __init__(self, model, processor, family: Family, device: torch.device, *, precision: str = "fp32"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.family = family
        self.device = device
        self.precision = effective_precision(device, precision)
        self._lock = threading.Lock()  # a session's forward mutates it; the model runs one frame at a time
        config = model.config
        # how far back a frame reads its own object's past (module docstring)
        self.history_frames = max(int(config.num_maskmem) - 1, int(config.max_object_pointers_in_encoder) - 1, 1)

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "VideoTracker":
        import transformers

        device = pick_device(spec.device)
        model_class = family.details["video_model_class"]
        try:
            logger.info("loading %s video tracker from %s on %s", family.name, spec.checkpoint, device)
            processor = getattr(transformers, family.details["video_processor_class"]).from_pretrained(spec.checkpoint)
            model, loading = getattr(transformers, model_class).from_pretrained(spec.checkpoint,
                                                                                output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(describe_load_failure(spec.checkpoint, exc, "video tracker", spec.setting)) from None
        if loading.get("missing_keys"):  # random memory weights would track noise
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"{spec.setting}={spec.checkpoint!r}: the checkpoint lacks {len(missing)} of "
                                 f"{model_class}'s weights (for example {', '.join(missing[:3])}); a video tracker "
                                 "needs the video model's memory weights (the hub's sam2.1 / EdgeTAM checkpoints)")
        return cls(model, processor, family, device, precision=spec.precision)

    def open(self, height: int, width: int) -> "TrackerSession":
        session = self.processor.init_video_session(inference_device=self.device, dtype=torch.float32)
        return TrackerSession(self, session, height, width)


class TrackerSession:
    """One video's objects, frame after frame. `track(frame)` moves every object to the next frame; `add(boxes)`
    starts new objects on the frame just tracked. Frames are numbered by the caller, in order, without gaps."""

    def __init__(self, tracker: VideoTracker, session, height: int, width: int):
        self.tracker = tracker
        self.session = session
        self.height, self.width = height, width
        self.frame_index = -1
        self._pixels: torch.Tensor | None = None  # the current frame, prepared once for both calls on it

    @property
    def object_ids(self) -> list[int]:
        return list(self.session.obj_ids)

    def track(self, frame: np.ndarray, *, with_masks: bool = False) -> FrameTracks:
        """Move to the next frame (H x W x 3 uint8 RGB) and say where every object is on it."""
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, the session's video "
                             f"{self.width}x{self.height}")
        self.frame_index += 1
        processor = self.tracker.processor
        self._pixels = processor(images=frame, return_tensors="pt")["pixel_values"][0]
        if not self.session.obj_ids:  # nothing to track: keep the frame for objects added on it
            self.session.add_new_frame(self._pixels, self.frame_index)
            self.forget_the_past()
            return FrameTracks()
        return self._forward(with_masks)

    def add(self, object_ids: list[int], boxes: np.ndarray, *, with_masks: bool = False) -> FrameTracks:
        """Start objects on the frame last tracked, each from a box (xyxy pixels); where every object is there.
        transformers runs every object on that frame again (each with the same inputs: the same answer)."""
        if self.frame_index < 0:
            raise ValueError("track a frame before adding objects to it")
        taken = set(self.session.obj_ids) & set(object_ids)
        if taken:
            raise ValueError(f"object ids {sorted(taken)} are already in the session")
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.tracker.processor.add_inputs_to_inference_session(
            self.session, frame_idx=self.frame_index, obj_ids=list(object_ids),
            input_boxes=[[list(map(float, box)) for box in boxes]], original_size=(self.height, self.width))
        return self._forward(with_masks)

    def _forward(self, with_masks: bool) -> FrameTracks:
        tracker = self.tracker
        with tracker._lock, torch.inference_mode(), autocast_for(tracker.device, tracker.precision):
            output = tracker.model(inference_session=self.session, frame=self._pixels, frame_idx=self.frame_index)
            masks = tracker.processor.post_process_masks(
                [output.pred_masks], original_sizes=[[self.height, self.width]], binarize=True)[0]
        masks = masks[:, 0].cpu().numpy().astype(bool)
        boxes, present = mask_boxes(masks)
        self.forget_the_past()
        return FrameTracks(list(output.object_ids), boxes, present, masks if with_masks else None)

    def forget_the_past(self) -> None:
        """Drop what the model will not read again (module docstring)."""
        session, now = self.session, self.frame_index
        for index in [i for i in (session.processed_frames or {}) if i < now]:
            del session.processed_frames[index]
        forget_object_history(session, now, now - self.tracker.history_frames)

    def drop(self, object_ids: list[int]) -> None:
        """Stop tracking these objects: the session keeps the others' state, re-indexed as transformers indexes it."""
        session = self.session
        gone = set(object_ids)
        kept = [i for i in session.obj_ids if i not in gone]
        if len(kept) == len(session.obj_ids):
            return
        state = {obj_id: (session.point_inputs_per_obj[index], session.mask_inputs_per_obj[index],
                          session.output_dict_per_obj[index], session.frames_tracked_per_obj[index])
                 for obj_id in kept for index in [session.obj_id_to_idx(obj_id)]}
        pending = [i for i in session.obj_with_new_inputs if i not in gone]
        session.reset_tracking_data()  # keeps the frames and the cached vision features
        for obj_id in kept:
            index = session.obj_id_to_idx(obj_id)
            (session.point_inputs_per_obj[index], session.mask_inputs_per_obj[index],
             session.output_dict_per_obj[index], session.frames_tracked_per_obj[index]) = state[obj_id]
        session.obj_with_new_inputs = pending

    def close(self) -> None:
        self.session.reset_inference_session()
        self.session.processed_frames = None
