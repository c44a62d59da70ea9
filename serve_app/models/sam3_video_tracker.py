"""The `concept` pipeline on videos: SAM 3's video model (`Sam3VideoModel`, the hub's facebook/sam3) finds every
instance of each phrase on each frame and tracks it with an identity, streamed one frame at a time as transformers
streams it (`processor.add_text_prompt`, then `model(inference_session=, frame=)` and `postprocess_outputs`).

transformers' streaming session keeps every frame and every per-frame record, and deep-copies its per-frame tracker
scores on every frame (work and memory growing with the video). `forget_the_past` drops what streaming never reads
again:
- a frame's pixels once it is processed, and the tracker's masks of past frames;
- each object's tracker memory beyond the 15 frames back its tracker reads (as serve_app.models.video_tracker);
- per-frame tracker scores and suppressions of past frames (each frame reads its own);
- the hot-start bookkeeping (unmatched and overlapping frames), which only whole-video propagation reads:
  transformers disables hot-start removal when streaming.
These leave the outputs equal to an unpruned transformers session (tests/test_sam3_video.py). One thing grows: an
empty entry per frame in `processed_frames` (about 100 bytes), since its tracker counts the session's frames to
know which past frames hold object pointers: 3.6 MB for an hour sampled at 10 frames a second.

Two bounds change what the model would do, and say so:
- an object its tracker has not seen for `lost_after` frames leaves the session (`remove_object`); transformers
  would track it for ever, each frame costing more;
- an object keeps its first conditioning frame and its latest `MAX_CONDITIONING_FRAMES - 1`: SAM 3 re-conditions
  matched objects every 16 frames, and its tracker reads every conditioning frame's object pointer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from serve_app import get_logger
from serve_app.models.catalog import Family
from serve_app.models.device import autocast_for, effective_precision, pick_device
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.spec import ModelSpec
from serve_app.models.video_tracker import VideoTracker, forget_object_history

logger = get_logger(__name__)

HISTORY_FRAMES = 16  # the tracker reads 6 frames of memory and 15 of object pointers back; one more for safety
MAX_CONDITIONING_FRAMES = 8


@dataclass
class FrameObjects:
    """The objects SAM 3 shows on one frame."""

    object_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # xyxy pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    phrase_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    masks: np.ndarray | None = None  # N x H x W bool, when asked for
    live: int = 0  # objects in the session after this frame


class Sam3VideoTracker:
    """SAM 3's video model: it detects as well as tracks (`detects`), so the Detector sees no video frames."""

    detects = True

    def __init__(self, model, processor, device: torch.device, *, precision: str = "fp32", spec: ModelSpec | None = None,
                 family: Family | None = None):
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.precision = effective_precision(device, precision)
        self._lock = threading.Lock()
        self._spec, self._family = spec, family
        self._box_tracker = None

    def box_tracker(self):
        """SAM 3's tracker alone (`Sam3TrackerVideoModel`, which transformers loads from the same checkpoint), for a
        box drawn in the editor: loaded on the first such request, with its own copy of the image encoder."""
        with self._lock:
            if self._box_tracker is None:
                import transformers

                if self._spec is None:
                    raise ValueError("this SAM 3 video model was not loaded from a checkpoint: no box tracker")
                checkpoint = self._spec.checkpoint
                logger.info("loading SAM 3's tracker from %s for boxes drawn on videos", checkpoint)
                model = transformers.Sam3TrackerVideoModel.from_pretrained(checkpoint)
                processor = transformers.Sam3TrackerVideoProcessor.from_pretrained(checkpoint)
                self._box_tracker = VideoTracker(model, processor, self._family, self.device,
                                                 precision=self._spec.precision)
            return self._box_tracker

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "Sam3VideoTracker":
        import transformers

        device = pick_device(spec.device)
        try:
            logger.info("loading SAM 3's video model from %s on %s", spec.checkpoint, device)
            processor = transformers.Sam3VideoProcessor.from_pretrained(spec.checkpoint)
            model, loading = transformers.Sam3VideoModel.from_pretrained(spec.checkpoint, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(describe_load_failure(spec.checkpoint, exc, "SAM 3 video", spec.setting)) from None
        if loading.get("missing_keys"):
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"{spec.setting}={spec.checkpoint!r}: the checkpoint lacks {len(missing)} of "
                                 f"Sam3VideoModel's weights (for example {', '.join(missing[:3])}); SAM 3 tracks "
                                 "videos from the hub's facebook/sam3 (a sam3_video checkpoint)")
        return cls(model, processor, device, precision=spec.precision, spec=spec, family=family)

    def open(self, height: int, width: int, phrases: list[str], *, lost_after: int = 4,
             max_objects: int = 32) -> "Sam3VideoSession":
        if not phrases:
            raise ValueError("SAM 3 tracks the phrases of a prompt: none was given")
        session = self.processor.init_video_session(inference_device=self.device, dtype=torch.float32)
        self.processor.add_text_prompt(session, list(phrases))
        return Sam3VideoSession(self, session, height, width, list(phrases), lost_after=lost_after,
                                max_objects=max_objects)


class Sam3VideoSession:
    def __init__(self, tracker: Sam3VideoTracker, session, height: int, width: int, phrases: list[str], *,
                 lost_after: int, max_objects: int):
        self.tracker, self.session = tracker, session
        self.height, self.width = height, width
        self.phrases = phrases
        self.lost_after, self.max_objects = lost_after, max_objects
        self.frame_index = -1
        self._pixels_kept_from = 0
        self._unseen: dict[int, int] = {}

    @property
    def object_ids(self) -> list[int]:
        return list(self.session.obj_ids)

    def step(self, frame: np.ndarray, *, with_masks: bool = False) -> FrameObjects:
        tracker, processor = self.tracker, self.tracker.processor
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame is {frame.shape[1]}x{frame.shape[0]}, the session's video "
                             f"{self.width}x{self.height}")
        self.frame_index += 1
        pixels = processor(images=frame, return_tensors="pt")["pixel_values"][0]
        with tracker._lock, torch.inference_mode(), autocast_for(tracker.device, tracker.precision):
            model = tracker.model
            limit, model.max_num_objects = model.max_num_objects, self.max_objects  # per session, under the lock
            try:
                output = model(inference_session=self.session, frame=pixels, frame_idx=self.frame_index)
            finally:
                model.max_num_objects = limit
            found = processor.postprocess_outputs(self.session, output, original_sizes=[[self.height, self.width]])
        ids = found["object_ids"].cpu().numpy().astype(np.int64)
        prompt_of = self.session.obj_id_to_prompt_id
        result = FrameObjects(
            object_ids=ids, boxes=found["boxes"].float().cpu().numpy().reshape(-1, 4),
            scores=found["scores"].float().cpu().numpy().reshape(-1),
            phrase_ids=np.array([prompt_of[int(i)] for i in ids], np.int64),
            masks=found["masks"].cpu().numpy().astype(bool) if with_masks else None)
        self._leave_lost(set(int(i) for i in ids))
        self.forget_the_past()
        result.live = len(self.session.obj_ids)
        return result

    def _leave_lost(self, shown: set[int]) -> None:
        for obj_id in list(self.session.obj_ids):
            self._unseen[obj_id] = 0 if obj_id in shown else self._unseen.get(obj_id, 0) + 1
            if self._unseen[obj_id] >= self.lost_after:
                self._remove(obj_id)

    def _remove(self, obj_id: int) -> None:
        session = self.session
        session.remove_object(obj_id)
        self._unseen.pop(obj_id, None)
        for per_object in (session.obj_id_to_score, session.obj_id_to_last_occluded, session.obj_first_frame_idx,
                           session.trk_keep_alive, session.unmatched_frame_inds):
            per_object.pop(obj_id, None)

    def forget_the_past(self) -> None:
        session, now = self.session, self.frame_index
        oldest_read = now - HISTORY_FRAMES
        # past frames' pixels go, their entries stay (None): SAM 3's tracker runs its propagation as on a whole video
        # and reads an object pointer only from frames numbered below len(processed_frames)
        frames = session.processed_frames or {}
        for index in range(self._pixels_kept_from, now):
            if index in frames:
                frames[index] = None
        self._pixels_kept_from = max(self._pixels_kept_from, now)
        forget_object_history(session, now, oldest_read, MAX_CONDITIONING_FRAMES)
        for by_frame in (session.obj_id_to_tracker_score_frame_wise, session.suppressed_obj_ids):
            for index in [i for i in by_frame if i < now]:
                del by_frame[index]
        session.unmatched_frame_inds.clear()
        session.overlap_pair_to_frame_inds.clear()

    def close(self) -> None:
        self.session.reset_state()
        self.session.processed_frames = None
