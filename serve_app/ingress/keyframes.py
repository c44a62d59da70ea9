"""A track as Label Studio's `videorectangle` keyframes: only where the editor's interpolation would be wrong.

The editor draws a box between two enabled keyframes by linear interpolation of x, y, width and height over
frame numbers. So a keyframe is needed only where the track departs from the straight line between its
neighbours by more than the tolerance (VIDEO_KEYFRAME_TOLERANCE, percent of the frame): Douglas-Peucker over the
four coordinates. A steady object is two keyframes for an hour; a track that disappears gets a keyframe with
`enabled: false` at its last sighting, which hides it until its next keyframe.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serve_app.ingress.tracks import Track


def editor_frame(time_s: float, framerate: float) -> int:
    """The editor's 1-based frame number of the frame shown at `time_s` with the `<Video framerate>` attribute."""
    return int(round(time_s * framerate)) + 1


def essential(frames: np.ndarray, values: np.ndarray, tolerance: float) -> np.ndarray:
    """Indices of the points to keep (first and last always) so that linear interpolation between kept points
    is within `tolerance` of every dropped one in every coordinate. `frames` strictly increasing; values N x D."""
    n = len(frames)
    if n <= 2:
        return np.arange(n)
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    spans = [(0, n - 1)]
    while spans:  # an explicit stack: a track of 100,000 points must not recurse that deep
        first, last = spans.pop()
        if last - first < 2:
            continue
        inner = slice(first + 1, last)
        share = (frames[inner] - frames[first]) / (frames[last] - frames[first])
        line = values[first] + share[:, None] * (values[last] - values[first])
        error = np.abs(values[inner] - line).max(axis=1)
        worst = int(np.argmax(error))
        if error[worst] > tolerance:
            split = first + 1 + worst
            keep[split] = True
            spans.extend(((first, split), (split, last)))
    return np.flatnonzero(keep)


def _segments(track: Track, max_gap: int) -> list[list[int]]:
    """Runs of the track's points with no more than `max_gap` sampled frames between neighbours."""
    runs: list[list[int]] = [[0]]
    for i in range(1, len(track.points)):
        if track.points[i].number - track.points[i - 1].number > max_gap:
            runs.append([])
        runs[-1].append(i)
    return runs


def track_sequence(track: Track, *, width: int, height: int, framerate: float, tolerance: float,
                   sample_step: int = 1) -> list[dict[str, Any]]:
    """The track's keyframes. Where the detector did not find the object on a sampled frame the track is
    hidden (`enabled: false` at its last sighting) and shown again at its next one."""
    sequence: list[dict[str, Any]] = []
    for run in _segments(track, max_gap=sample_step):
        points = [track.points[i] for i in run]
        frames = np.array([editor_frame(p.time_s, framerate) for p in points], np.float64)
        # two samples that fall on one editor frame (a track rate above the editor's): keep the later
        distinct = np.append(frames[1:] != frames[:-1], True)
        points, frames = [p for p, d in zip(points, distinct) if d], frames[distinct]
        values = np.array([_percent(p.box, width, height) for p in points], np.float64)
        for k, i in enumerate(essential(frames, values, tolerance)):
            x, y, w, h = values[i]
            sequence.append({"frame": int(frames[i]), "time": points[i].time_s, "enabled": True, "rotation": 0,
                             "x": x, "y": y, "width": w, "height": h})
        sequence[-1]["enabled"] = False  # gone after its last sighting, until the next run's first keyframe
    if sequence:
        sequence[-1]["enabled"] = False
    return sequence


def _percent(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    return 100.0 * x0 / width, 100.0 * y0 / height, 100.0 * (x1 - x0) / width, 100.0 * (y1 - y0) / height
