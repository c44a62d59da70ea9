"""Boxes found on sampled frames, linked into one track per object with ByteTrack (Roboflow's `trackers`).

The detector sees each sampled frame alone; ByteTrack (Zhang et al., 2022) associates its boxes across frames by
a Kalman-predicted IoU, so an object keeps one identity while it moves, and one that is missed for a few frames
(or crosses another) is matched again instead of starting a new track. One tracker per label: a box is never
linked to an object of another label. A track holds only the frames where the detector found the object.

ByteTrack names a new track at its second sighting (trackers 2.1 returns the first with id -1): the first sighting
is the previous frame's unnamed box that the new track overlaps most, as ByteTrack itself matched it. An object
seen on one sampled frame only is not a track.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrackPoint:
    number: int  # the sampled frame's count (serve_app.ingress.videos.SampledFrame.number)
    time_s: float
    box: tuple[float, float, float, float]  # xyxy, pixels of the upright frame
    score: float


@dataclass
class Track:
    label: str
    points: list[TrackPoint] = field(default_factory=list)

    @property
    def score(self) -> float:
        return float(np.mean([p.score for p in self.points])) if self.points else 0.0


class TrackLinker:
    """Feed it each sampled frame's detections in order; `tracks()` gives every object's track."""

    def __init__(self, labels: tuple[str, ...], *, track_fps: float, box_threshold: float, lost_after_s: float = 2.0):
        from trackers import ByteTrackTracker

        self._labels = labels
        self._tracks: dict[tuple[int, int], Track] = {}  # (label index, tracker id) -> its track
        self._unnamed: list[list[TrackPoint]] = [[] for _ in labels]  # per label: the last frame's new boxes
        # every box the detector kept may start a track at once (a short clip or one sighting is still an object);
        # ByteTrack's low-score second pass is not used, the detector's threshold already decided
        # trackers counts the lost buffer in frames at 30 fps and scales it by frame_rate / 30
        lost_frames = max(1, round(lost_after_s * track_fps))
        self._trackers = [ByteTrackTracker(lost_track_buffer=math.ceil(lost_frames * 30 / track_fps),
                                           frame_rate=track_fps, track_activation_threshold=box_threshold,
                                           minimum_consecutive_frames=1, high_conf_det_threshold=box_threshold)
                          for _ in labels]

    def add(self, number: int, time_s: float, boxes: np.ndarray, scores: np.ndarray, labels: list[str]) -> None:
        import supervision as sv

        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scores = np.asarray(scores, np.float32).reshape(-1)
        for index, (label, tracker) in enumerate(zip(self._labels, self._trackers)):
            chosen = np.array([found == label for found in labels], bool)
            detections = sv.Detections(xyxy=boxes[chosen].astype(np.float64), confidence=scores[chosen],
                                       class_id=np.zeros(int(chosen.sum()), int))
            linked = tracker.update(detections)  # every frame, even without boxes: lost tracks age
            unnamed = []
            for box, score, tracker_id in zip(linked.xyxy, linked.confidence, linked.tracker_id):
                point = TrackPoint(number, time_s, tuple(float(v) for v in box), float(score))
                if tracker_id < 0:  # a new track's first sighting: named at its second
                    unnamed.append(point)
                    continue
                key = (index, int(tracker_id))
                if key not in self._tracks:
                    self._tracks[key] = Track(label, _first_sighting(point, self._unnamed[index]))
                self._tracks[key].points.append(point)
            self._unnamed[index] = unnamed

    def tracks(self) -> list[Track]:
        """Every track, ordered by where it starts, then by label."""
        return sorted((t for t in self._tracks.values() if t.points),
                      key=lambda t: (t.points[0].number, self._labels.index(t.label)))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _first_sighting(point: TrackPoint, previous: list[TrackPoint]) -> list[TrackPoint]:
    """The previous frame's unnamed box this newly named track grew from, if any (taken, so used once)."""
    if not previous:
        return []
    best = max(range(len(previous)), key=lambda i: _iou(point.box, previous[i].box))
    if _iou(point.box, previous[best].box) <= 0:
        return []
    return [previous.pop(best)]
