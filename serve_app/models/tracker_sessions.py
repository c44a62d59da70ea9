"""The videos one tracker holds at once, Ray-free: the Tracker deployment, the benchmarks and the fast tests share it.
Each is a `detect+track` session (serve_app.models.detect_and_track) over a SAM 2.1 / EdgeTAM video model, or a
`concept` session of SAM 3's video model, which detects as well (serve_app.models.sam3_video_tracker).

A session lives from a video's first frame to its `close`. A replica holds at most `max_sessions`; one not stepped
for `idle_s` (its caller died or gave up) makes room for a new one. A step for a session this replica does not hold
(it was restarted, or idle too long) is refused, never silently started anew mid-video.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from serve_app.models.detect_and_track import DetectAndTrack
from serve_app.models.messages import TrackedObjects, TrackerUnavailable, TrackStep
from serve_app.models.video_tracker import VideoTracker


class TrackerSessions:
    def __init__(self, tracker: VideoTracker, *, max_sessions: int = 8, idle_s: float = 300.0,
                 max_objects: int = 32, lost_after_s: float = 2.0, clock=time.monotonic):
        self.tracker = tracker
        self.max_sessions, self.idle_s = max_sessions, idle_s
        self.max_objects, self.lost_after_s = max_objects, lost_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[DetectAndTrack, int]] = OrderedDict()  # key -> (session, frame)
        self._used: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def step(self, request: TrackStep) -> TrackedObjects:
        if request.close:
            self.close(request.image_key)
            return TrackedObjects()
        tracking = self._session_for(request)
        if not isinstance(tracking, DetectAndTrack):  # SAM 3: the tracker finds the phrases itself
            found = tracking.step(request.image)
            self._stepped(request)
            return TrackedObjects(object_ids=found.object_ids, boxes=found.boxes, scores=found.scores,
                                  phrase_ids=found.phrase_ids, live=found.live)
        step = tracking.step(request.image, request.boxes, request.phrase_ids, request.scores)
        self._stepped(request)
        objects = step.objects
        return TrackedObjects(
            object_ids=np.array([o.object_id for o in objects], np.int64),
            boxes=np.array([o.box for o in objects], np.float32).reshape(-1, 4),
            scores=np.array([o.score for o in objects], np.float32),
            phrase_ids=np.array([o.label for o in objects], np.int64), merged=step.merged, refused=step.refused,
            live=len(tracking.session.object_ids))

    @property
    def detects(self) -> bool:
        return bool(getattr(self.tracker, "detects", False))

    def _stepped(self, request: TrackStep) -> None:
        with self._lock:
            if request.image_key in self._sessions:
                self._sessions[request.image_key] = (self._sessions[request.image_key][0], request.frame)

    def _session_for(self, request: TrackStep):
        key, now = request.image_key, self._clock()
        with self._lock:
            held = self._sessions.get(key)
            if held is not None:
                tracking, last = held
                if request.frame != last + 1:
                    raise TrackerUnavailable(f"the tracker got frame {request.frame} of a video after frame {last}")
                self._used[key] = now
                self._sessions.move_to_end(key)
                return tracking
            if request.frame != 0:
                raise TrackerUnavailable(
                    "the tracker replica holding this video's session restarted or dropped it (idle beyond "
                    "TRACKER_SESSION_IDLE_S); the task stays retryable and starts the video again")
            for stale in [k for k, used in self._used.items() if now - used >= self.idle_s]:
                self._close_locked(stale)
            if len(self._sessions) >= self.max_sessions:
                raise TrackerUnavailable(
                    f"the tracker replica holds {self.max_sessions} videos (TRACKER_MAX_SESSIONS); the task stays "
                    "retryable, or add Tracker replicas")
            height, width = request.image.shape[:2]
            lost_after = max(1, round(self.lost_after_s * request.fps)) if request.fps > 0 else 4
            if self.detects and request.phrases:
                tracking = self.tracker.open(height, width, list(request.phrases), lost_after=lost_after,
                                             max_objects=self.max_objects)
            else:  # boxes: the detector's, or one drawn in the editor (SAM 3: its tracker alone)
                boxes = self.tracker.box_tracker() if self.detects else self.tracker
                tracking = DetectAndTrack(boxes.open(height, width), max_objects=self.max_objects,
                                          lost_after=lost_after)
            self._sessions[key] = (tracking, -1)
            self._used[key] = now
            return tracking

    def close(self, key: str) -> None:
        with self._lock:
            self._close_locked(key)

    def _close_locked(self, key: str) -> None:
        held = self._sessions.pop(key, None)
        self._used.pop(key, None)
        if held is not None:
            (held[0].session if isinstance(held[0], DetectAndTrack) else held[0]).close()
