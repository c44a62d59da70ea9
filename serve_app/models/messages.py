"""What callers send to and get back from the models: numpy only, so the ingress never imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from serve_app.masks.rle import MaskRuns


class PromptUnsupported(ValueError):
    """The model cannot answer this kind of prompt (for example clicks to a SAM 3 checkpoint without its tracker):
    the caller's mistake, reported as such, never a replica failure."""


class Priority(IntEnum):
    """Which work a model replica takes first when items queue: lower first. A click in the editor must
    not wait behind a "Retrieve predictions" or a background job (serve_app.ingress.jobs)."""

    INTERACTIVE = 0  # the labeling editor: a prompt, a click, a drawn box
    BATCH = 1  # a /predict that Label Studio is still waiting for
    BACKGROUND = 2  # tasks finished after the /predict answered, written through Label Studio's API


@dataclass
class DetectionRequest:
    image: np.ndarray  # H x W x 3, uint8, RGB, EXIF orientation already applied
    phrases: list[str]
    box_threshold: float = 0.30
    text_threshold: float = 0.25
    max_detections: int = 100
    priority: int = Priority.INTERACTIVE
    # content hash of the image: the embedding-cache key of a model that caches vision features (SAM 3), so a
    # click after a text prompt on the same image reuses them; empty: not cached
    image_key: str = ""
    # Visual exemplars (serve_app.models.catalog's `exemplars` families): boxes drawn on this image, E x 4 xyxy
    # pixels, each "more like this" (label 1) or "not this" (0), each serving one phrase of `phrases` (an index;
    # that phrase's text may be "" when the exemplars alone are the prompt). None: text only.
    exemplar_boxes: np.ndarray | None = None
    exemplar_labels: np.ndarray | None = None  # E, 1 positive / 0 negative
    exemplar_phrases: np.ndarray | None = None  # E, index into phrases
    # the score what the exemplars find needs; a phrase's text keeps box_threshold. None: box_threshold
    exemplar_threshold: float | None = None
    # Forms to send back instead of the pixel masks of a detector that segments too (SAM 3), computed in its
    # replica as the Segmenter's are (SegmentationRequest.encodings)
    encodings: tuple[str, ...] = ()
    polygon_tolerance_px: float = 1.0
    # boxes are all the caller uses (a video frame: tracks are boxes): a detector that segments too sends no masks
    boxes_only: bool = False

    def exemplars_of(self, phrase: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes E x 4 xyxy pixels, labels E) of the exemplars serving phrase `phrase`."""
        if self.exemplar_boxes is None or not len(self.exemplar_boxes):
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        chosen = np.asarray(self.exemplar_phrases) == phrase
        return (np.asarray(self.exemplar_boxes, np.float32)[chosen],
                np.asarray(self.exemplar_labels, np.int64)[chosen])


@dataclass
class Detections:
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # xyxy, pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    phrase_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # index into phrases
    # N x H x W bool, one per box, from a detector that segments too (SAM 3); None: boxes only
    masks: np.ndarray | None = None
    # those masks encoded in the replica (DetectionRequest.encodings), in place of `masks`
    encoded: Masks | None = None

    def __len__(self) -> int:
        return len(self.scores)

    # Masks travel packed, 8 pixels per byte, as Masks' do.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.masks is not None:
            masks = np.asarray(self.masks, bool)
            state["masks"] = (masks.shape, np.packbits(masks, axis=None))
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("masks") is not None:
            shape, packed = state["masks"]
            state["masks"] = np.unpackbits(packed, count=int(np.prod(shape))).view(bool).reshape(shape)
        self.__dict__.update(state)


@dataclass
class SegmentationRequest:
    """Without points: one mask per box. With points (clicks): one mask from all points and the first box, if any."""

    image: np.ndarray  # H x W x 3, uint8, RGB
    boxes: np.ndarray  # N x 4, xyxy in pixels of `image`
    image_key: str = ""  # content hash of the image: embedding-cache key and replica-affinity key
    points: np.ndarray | None = None  # P x 2, xy in pixels
    point_labels: np.ndarray | None = None  # P, 1 = positive click, 0 = negative click
    # Forms to send back instead of pixel masks ("rle", "polygons"; serve_app.masks.encode), computed in the
    # segmenter replica; empty: the pixel masks themselves.
    encodings: tuple[str, ...] = ()
    polygon_tolerance_px: float = 1.0
    priority: int = Priority.INTERACTIVE


@dataclass
class Masks:
    masks: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0), bool))  # N x H x W
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # predicted IoU
    cache_hit: bool = False  # the image embedding came from the cache: the encoder did not run for it
    rle: list[np.ndarray] | None = None  # per mask, Label Studio brush RLE bytes, when requested
    polygons: list[list] | None = None  # per mask, its polygons in percent of the image, when requested
    # per mask, where its runs start, in place of the pixels (`masks` then N x 0 x 0): a GPU segmenter's answer
    # when only RLE was asked for (serve_app.models.device_masks)
    runs: list[MaskRuns] | None = None

    # Between processes masks travel packed, 8 pixels per byte: 25 masks of 640x480 are 0.96 MB, not 7.7 MB,
    # to write into and read from Ray's object store.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        masks = np.asarray(self.masks, bool)
        state["masks"] = (masks.shape, np.packbits(masks, axis=None))
        return state

    def __setstate__(self, state: dict) -> None:
        shape, packed = state["masks"]
        count = int(np.prod(shape))
        state["masks"] = np.unpackbits(packed, count=count).view(bool).reshape(shape)
        self.__dict__.update(state)


class TrackerUnavailable(RuntimeError):
    """The Tracker cannot carry this video on: its session was lost with a replica, or the replica holds its most
    sessions. The task fails with this message and stays retryable; the other tasks go on."""


@dataclass
class TrackStep:
    """One sampled frame of one video for the Tracker, in order: in `detect+track` the detector's boxes on it start
    and confirm objects; in `concept` the tracker finds the phrases itself. `close=True` (and no image) ends the
    video's session."""

    image_key: str  # the video's session; the affinity router sends every frame of a video to one replica
    frame: int  # 0, 1, 2, ... the video's sampled frames, without gaps
    fps: float = 0.0  # sampled frames per second of video (frame 0 sets the session's TRACKER_LOST_AFTER_S in frames)
    image: np.ndarray | None = None  # H x W x 3 uint8 RGB
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # the detector's, xyxy pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    phrase_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    # the prompt's phrases, for a tracker that detects (SAM 3's video model: the `concept` pipeline), which then
    # gets no boxes; frame 0 starts its session with them
    phrases: tuple[str, ...] = ()
    close: bool = False


@dataclass
class TrackedObjects:
    """Where the video's objects are on one frame."""

    object_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # xyxy pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))  # their detections' scores
    phrase_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # as TrackStep's (or phrases)
    merged: dict[int, int] = field(default_factory=dict)  # object id -> the older object it turned out to be
    refused: int = 0  # detections that would have started an object beyond TRACKER_MAX_OBJECTS
    live: int = 0  # objects the session still tracks, seen here or not (0: every object has left)
