"""`detect+track` on one video: the detector's boxes start objects, the video tracker (serve_app.models.video_tracker)
carries each one from frame to frame.

On each sampled frame: every live object is tracked onto it; each detection is matched to the live object of its
label that its box overlaps most (IoU at least `match_iou`); a detection that matches none starts an object from its
box. An object the tracker has not seen for `lost_after` frames ends and leaves the session. Two objects of one label
that the tracker has drifted onto the same thing (IoU at least `merge_iou`) are one object: the younger is merged
into the older, so one object is one region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serve_app.models.video_tracker import TrackerSession


@dataclass
class TrackedObject:
    object_id: int
    label: int  # the phrase (label) index the detector gave it
    box: tuple[float, float, float, float]  # xyxy pixels on this frame
    score: float  # the matched detection's score; the object's last one where no detection matched


@dataclass
class TrackingStep:
    objects: list[TrackedObject] = field(default_factory=list)  # present on this frame
    merged: dict[int, int] = field(default_factory=dict)  # object id -> the older object it turned out to be
    ended: list[int] = field(default_factory=list)  # objects lost for good on this frame
    refused: int = 0  # new objects not started: the session already tracks max_objects


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N x 4 xyxy) with every box in b (M x 4)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class DetectAndTrack:
    def __init__(self, session: TrackerSession, *, match_iou: float = 0.3, merge_iou: float = 0.7,
                 lost_after: int = 4, max_objects: int = 32):
        self.session = session
        self.match_iou, self.merge_iou = match_iou, merge_iou
        self.lost_after, self.max_objects = lost_after, max_objects
        self._labels: dict[int, int] = {}
        self._scores: dict[int, float] = {}
        self._misses: dict[int, int] = {}
        self._next_id = 1

    def step(self, frame: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> TrackingStep:
        """One sampled frame (H x W x 3 RGB) and the detector's boxes on it (xyxy pixels, label indices, scores)."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        labels, scores = np.asarray(labels, np.int64).reshape(-1), np.asarray(scores, np.float32).reshape(-1)
        step = TrackingStep()
        tracked = self.session.track(frame)
        matched = self._match(tracked, boxes, labels, scores)
        unmatched = [i for i in np.argsort(-scores, kind="stable") if i not in matched]
        room = self.max_objects - len(tracked.object_ids)
        step.refused = max(0, len(unmatched) - max(room, 0))
        unmatched = unmatched[:max(room, 0)]
        if unmatched:
            new_ids = list(range(self._next_id, self._next_id + len(unmatched)))
            self._next_id += len(unmatched)
            for object_id, i in zip(new_ids, unmatched):
                self._labels[object_id], self._scores[object_id] = int(labels[i]), float(scores[i])
                self._misses[object_id] = 0
            tracked = self.session.add(new_ids, boxes[unmatched])
        present = {obj: (tuple(float(v) for v in box), bool(seen))
                   for obj, box, seen in zip(tracked.object_ids, tracked.boxes, tracked.present)}
        step.merged = self._merge(present)
        for object_id, (box, seen) in present.items():
            if object_id in step.merged:
                continue
            self._misses[object_id] = 0 if seen else self._misses[object_id] + 1
            if seen:
                step.objects.append(TrackedObject(object_id, self._labels[object_id], box, self._scores[object_id]))
            elif self._misses[object_id] >= self.lost_after:
                step.ended.append(object_id)
        self._forget(list(step.merged) + step.ended)
        return step

    def _match(self, tracked, boxes, labels, scores) -> set[int]:
        """Detections (indices) that are live objects: each object takes the detection of its label it overlaps
        most, best pairs first; that detection's score becomes the object's."""
        ids = [obj for obj, seen in zip(tracked.object_ids, tracked.present) if seen]
        if not ids or not len(boxes):
            return set()
        where = {obj: i for i, obj in enumerate(tracked.object_ids)}
        overlap = box_iou(tracked.boxes[[where[obj] for obj in ids]], boxes)
        same_label = np.array([[self._labels[obj] == label for label in labels] for obj in ids])
        overlap = np.where(same_label, overlap, 0.0)
        matched: set[int] = set()
        taken: set[int] = set()
        for flat in np.argsort(-overlap, axis=None, kind="stable"):
            row, column = divmod(int(flat), overlap.shape[1])
            if overlap[row, column] < self.match_iou:
                break
            if row in taken or column in matched:
                continue
            taken.add(row)
            matched.add(column)
            self._scores[ids[row]] = float(scores[column])
        return matched

    def _merge(self, present: dict[int, tuple[tuple[float, ...], bool]]) -> dict[int, int]:
        seen = [obj for obj, (_, visible) in present.items() if visible]
        merged: dict[int, int] = {}
        for i, older in enumerate(seen):  # ids grow with age: earlier is older
            if older in merged:
                continue
            for younger in seen[i + 1:]:
                if younger in merged or self._labels[younger] != self._labels[older]:
                    continue
                if box_iou(np.array(present[older][0]), np.array(present[younger][0]))[0, 0] >= self.merge_iou:
                    merged[younger] = older
        return merged

    def _forget(self, object_ids: list[int]) -> None:
        if not object_ids:
            return
        self.session.drop(object_ids)
        for object_id in object_ids:
            self._labels.pop(object_id, None)
            self._scores.pop(object_id, None)
            self._misses.pop(object_id, None)
