"""Real video files for tests, encoded with PyAV: coloured squares that move, cross, enter and leave.

`ColourDetector` stands in for trained detector weights, which cannot be downloaded here: it finds each square by
its colour, so tests can check that tracks follow objects. Everything around it (decode, batching, linking,
keyframes, Label Studio's format) is the service's real code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from scipy import ndimage

from serve_app.models.messages import DetectionRequest, Detections

RED, BLUE = (230, 30, 30), (30, 30, 230)
COLOURS = {"red": RED, "blue": BLUE}


@dataclass(frozen=True)
class Square:
    colour: str
    size: int
    start: tuple[float, float]  # top-left at t = 0, pixels
    velocity: tuple[float, float]  # pixels per second
    shown: tuple[float, float] = (0.0, 1e9)  # seconds it is on screen

    def box_at(self, t: float) -> tuple[float, float, float, float] | None:
        if not self.shown[0] <= t < self.shown[1]:
            return None
        x = self.start[0] + self.velocity[0] * t
        y = self.start[1] + self.velocity[1] * t
        return x, y, x + self.size, y + self.size


def render(squares: list[Square], t: float, width: int, height: int) -> np.ndarray:
    frame = np.full((height, width, 3), 90, np.uint8)
    for square in squares:
        box = square.box_at(t)
        if box is None:
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        frame[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = COLOURS[square.colour]
    return frame


def encode(squares: list[Square], *, seconds: float, fps: float = 25, width: int = 320, height: int = 240,
           codec: str = "libx264", pix_fmt: str = "yuv420p", container: str = "mp4", rotation: int = 0,
           times: list[float] | None = None, cut_at: float | None = None) -> bytes:
    """A video of the squares. `times` gives each frame's presentation time (a variable frame rate); a cut
    swaps the background at `cut_at` seconds."""
    buffer = io.BytesIO()
    times = times if times is not None else [i / fps for i in range(int(round(seconds * fps)))]
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)  # frames carry their own times
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18", "bf": "0"}
        if rotation:
            stream.set_display_rotation(rotation)
        for t in times:
            pixels = render(squares, t, width, height)
            if cut_at is not None and t >= cut_at:
                pixels[(pixels == 90).all(axis=2)] = 160
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = int(round(t * 1000))
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def audio_only(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16_000)
        stream.layout = "mono"
        samples = np.zeros((1, 1024), np.float32)
        for i in range(int(seconds * 16_000 / 1024)):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16_000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def no_frames() -> bytes:
    """A container with a video stream and not one frame in it."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # the header, with its video stream
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class ColourDetector:
    """Finds each coloured square whose colour is a phrase ("red", "blue"), as a trained detector would find an
    object: the box of each connected patch of the colour's pixels."""

    def __init__(self):
        self.calls = 0
        self.largest_batch = 0

    def detect(self, requests: list[DetectionRequest]) -> list[Detections]:
        self.calls += 1
        self.largest_batch = max(self.largest_batch, len(requests))
        return [self._one(r) for r in requests]

    @staticmethod
    def _one(request: DetectionRequest) -> Detections:
        boxes, scores, ids = [], [], []
        pixels = request.image.astype(np.int16)
        for index, phrase in enumerate(request.phrases):
            colour = COLOURS.get(phrase.strip().lower())
            if colour is None:
                continue
            near = (np.abs(pixels - np.array(colour, np.int16)) < 60).all(axis=2)
            patches, _ = ndimage.label(near)
            for rows, columns in ndimage.find_objects(patches):
                if (rows.stop - rows.start) * (columns.stop - columns.start) >= 16:
                    boxes.append((columns.start, rows.start, columns.stop, rows.stop))
                    scores.append(0.9)
                    ids.append(index)
        return Detections(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                          phrase_ids=np.array(ids, np.int64))



class ColourTracker:
    """Stands in for a trained video tracker (random tiny weights track nothing): each object is the patch of its
    prompt box's colour that overlaps the object's last box most, as serve_app.models.video_tracker's sessions
    answer (`open`, then `track` / `add` / `drop` / `close`)."""

    def open(self, height: int, width: int) -> "ColourTrackerSession":
        return ColourTrackerSession()


class ColourTrackerSession:
    def __init__(self):
        self.colours: dict[int, np.ndarray] = {}
        self.boxes: dict[int, np.ndarray] = {}
        self.seen: dict[int, bool] = {}
        self.image: np.ndarray | None = None
        self.closed = False

    @property
    def object_ids(self) -> list[int]:
        return list(self.colours)

    def track(self, image: np.ndarray):
        self.image = image.astype(np.int16)
        for object_id, colour in self.colours.items():
            near = (np.abs(self.image - colour) < 60).all(axis=2)
            patches, _ = ndimage.label(near)
            best, best_overlap = None, 0.0
            for rows, columns in ndimage.find_objects(patches):
                box = np.array((columns.start, rows.start, columns.stop, rows.stop), np.float32)
                overlap = _iou(box, self.boxes[object_id])
                if overlap > best_overlap:
                    best, best_overlap = box, overlap
            self.seen[object_id] = best is not None
            if best is not None:
                self.boxes[object_id] = best
        return self._tracks()

    def add(self, object_ids, boxes):
        for object_id, box in zip(object_ids, np.asarray(boxes, np.float32)):
            x0, y0, x1, y1 = box.astype(int)
            self.colours[object_id] = self.image[(y0 + y1) // 2, (x0 + x1) // 2]
            self.boxes[object_id], self.seen[object_id] = box, True
        return self._tracks()

    def drop(self, object_ids):
        for object_id in object_ids:
            del self.colours[object_id], self.boxes[object_id], self.seen[object_id]

    def close(self):
        self.closed = True

    def _tracks(self):
        from serve_app.models.video_tracker import FrameTracks

        ids = list(self.colours)
        return FrameTracks(ids, np.array([self.boxes[i] for i in ids], np.float32).reshape(-1, 4),
                           np.array([self.seen[i] for i in ids], bool))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return float(inter / union) if union > 0 else 0.0
