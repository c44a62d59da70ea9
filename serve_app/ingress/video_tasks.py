"""One video task: fetch to disk -> decode sampled frames -> detect on each (batched with every other request's
frames in the Detector) -> tracks -> Label Studio `videorectangle` regions. Tracks come from the Tracker's video
model when TRACKER_MODEL is set (`detect+track`; `concept` with SAM 3, whose video model also detects, so the
frames skip the Detector), else from ByteTrack linking the boxes (`detect+link`).

Memory is bounded whatever the video's length: the file is on disk, frames are decoded as they are needed, at
most VIDEO_FRAMES_IN_FLIGHT of them wait for the detector, and a track keeps a few numbers per sighting.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serve_app import get_logger
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.images import DownloadLimit
from serve_app.ingress.keyframes import track_sequence
from serve_app.ingress.tracks import Track, TrackLinker, TrackPoint
from serve_app.ingress.videos import VideoError, VideoLimits, probe, sample_frames
from serve_app.models.messages import DetectionRequest, Detections, TrackerUnavailable, TrackStep
from serve_app.settings import AUTO_TRACK_FPS, Settings

BRIDGED_SAMPLES = 2  # a track missed on one sampled frame is interpolated across it, not hidden

logger = get_logger(__name__)


@dataclass(frozen=True)
class VideoProgress:
    frames_done: int  # sampled frames searched
    frames_total: int  # sampled frames the video has, from its duration (an estimate for variable rates)


# Where a video task reports its frames: a background job sets it for each task it runs (GET /jobs shows them)
VIDEO_PROGRESS: contextvars.ContextVar[Callable[[VideoProgress], None] | None] = \
    contextvars.ContextVar("video_progress", default=None)


def video_limits(settings: Settings, framerate: float) -> VideoLimits:
    # VIDEO_TRACK_FPS=0 reaches here only outside the service (benchmarks, tests): Settings.with_defaults_for
    # decides it in the service, where the cluster's GPUs are known
    track_fps = min(settings.video_track_fps or AUTO_TRACK_FPS["cpu"], framerate)
    return VideoLimits(max_seconds=settings.max_video_seconds, max_pixels=settings.max_video_pixels,
                       max_frames=settings.max_video_frames, track_fps=track_fps)


def video_download_limit(settings: Settings) -> DownloadLimit:
    return DownloadLimit(settings.max_video_bytes, settings.video_download_timeout_s, noun="video",
                         bytes_setting="MAX_VIDEO_BYTES", timeout_setting="VIDEO_DOWNLOAD_TIMEOUT_S")


@contextlib.asynccontextmanager
async def _fetched(pipeline, request, task: dict, url: str):
    """The task's video on local disk for the block, probed against the caps: (its temporary directory, the file,
    its header, the config's frame rate for it, the caps)."""
    framerate = request.config.video.framerate_of(task["data"])
    limits = video_limits(pipeline.settings, framerate)
    fetcher = request.fetcher or pipeline.fetcher
    with tempfile.TemporaryDirectory(prefix="grounded-serve-video-") as directory:
        with pipeline.stage("fetch"):
            path = await fetcher.fetch_file(fetcher.resolve(url, task.get("id")), Path(directory),
                                            video_download_limit(pipeline.settings))
        info = await pipeline.run_blocking(probe, path, limits)
        yield Path(directory), path, info, framerate, limits


async def label_video(pipeline, request, task: dict, url: str) -> dict[str, Any]:
    """The task's prediction: one videorectangle region per object, for every label the prompt names. At most
    VIDEO_TASK_CONCURRENCY videos at once: each holds its file on disk and a decoder's thread time."""
    async with pipeline.video_slots:
        return await _label_video(pipeline, request, task, url)


async def _label_video(pipeline, request, task: dict, url: str) -> dict[str, Any]:
    if request.video_box is not None:
        return await _track_drawn_box(pipeline, request, task, url)
    return await _search_video(pipeline, request, task, url)


async def _search_video(pipeline, request, task: dict, url: str) -> dict[str, Any]:
    from serve_app.ingress.pipeline import task_priority

    progress = VIDEO_PROGRESS.get()
    config, s = request.config, pipeline.settings
    async with _fetched(pipeline, request, task, url) as (_, path, info, framerate, limits):
        phrases = request.prompt.phrases
        labels = tuple(dict.fromkeys(p.label for p in phrases))
        if pipeline.track is not None:
            # concept: SAM 3's video model gets the phrases and answers which phrase each object is
            linker = TrackedLinker(pipeline.track, labels, fps=limits.track_fps,
                                   phrases=tuple(p.text for p in phrases) if pipeline.track_detects else (),
                                   phrase_labels=tuple(p.label for p in phrases))
        else:
            linker = TrackLinker(labels, track_fps=limits.track_fps, box_threshold=request.thresholds.box)
        frames = sample_frames(path, limits)
        expected = max(1, int(info.duration_s * limits.track_fps) + 1)
        # decoded frames waiting for the detector: bounded, and counted in the ingress's pixel budget
        in_flight: collections.deque[tuple[Any, asyncio.Task]] = collections.deque()
        size: tuple[int, int] | None = None
        frame_bytes = info.width * info.height * 3
        done = 0

        def report(total: int) -> None:
            if progress is not None:
                progress(VideoProgress(done, total))

        async def link_oldest() -> None:
            nonlocal done
            frame, pixels, pending = in_flight.popleft()
            detections: Detections = await pending
            found = [phrases[int(i)].label for i in detections.phrase_ids]
            if isinstance(linker, TrackedLinker):
                with pipeline.stage("track"):
                    await linker.add(frame.number, frame.time_s, pixels, detections, found)
            else:
                linker.add(frame.number, frame.time_s, detections.boxes, detections.scores, found)
            done += 1
            report(max(expected, done))

        report(expected)
        async with pipeline.memory.hold(frame_bytes * s.video_frames_in_flight):
            try:
                while True:
                    with pipeline.stage("decode"):
                        frame = await pipeline.run_blocking(next, frames, None)
                    if frame is None:
                        break
                    height, width = frame.pixels.shape[:2]
                    if size is None:
                        size = (width, height)
                    elif size != (width, height):
                        raise VideoError(f"the video changes frame size mid-way ({size[0]}x{size[1]} to "
                                         f"{width}x{height}); boxes in percent would not mean the same")
                    detection = DetectionRequest(
                        image=frame.pixels, phrases=[p.text for p in phrases],
                        box_threshold=request.thresholds.box, text_threshold=request.thresholds.text,
                        # no image_key: a frame is never asked about again, so it would only evict images from a
                        # replica's cache, and unkeyed requests spread over the Detector's replicas
                        max_detections=s.max_detections, priority=task_priority(), boxes_only=True)
                    # the request holds the pixels now; the queue keeps them only for the tracker
                    pixels = frame.pixels if isinstance(linker, TrackedLinker) else None
                    frame.pixels = None
                    if pipeline.track_detects:  # the Tracker finds the phrases itself
                        pending = asyncio.get_running_loop().create_future()
                        pending.set_result(Detections())
                    else:
                        pending = asyncio.ensure_future(pipeline.detect(detection))
                    in_flight.append((frame, pixels, pending))
                    if len(in_flight) >= s.video_frames_in_flight:
                        await link_oldest()
                while in_flight:
                    await link_oldest()
            finally:
                for _, _, pending in in_flight:
                    pending.cancel()
                if isinstance(linker, TrackedLinker):
                    await linker.close()
                with contextlib.suppress(ValueError):  # still running in a thread when cancelled: GC closes it
                    frames.close()
        report(done)  # the estimate from the header gives way to the frames there were
        if size is None:
            raise VideoError("the video has no frames")
        width, height = size
        duration = max(info.duration_s, 0.0)
        with pipeline.stage("results"):
            return await pipeline.run_blocking(functools.partial(
                build_video_prediction, config, linker.tracks(), width=width, height=height, framerate=framerate,
                duration_s=duration, tolerance=s.video_keyframe_tolerance, model_version=pipeline.model_version))


def build_video_prediction(config, tracks: list[Track], *, width: int, height: int, framerate: float,
                           duration_s: float, tolerance: float, model_version: str) -> dict[str, Any]:
    """One `videorectangle` region per track, labels inside its value (the editor's own format)."""
    control = config.boxes
    regions, scores = [], []
    frames_count = max(1, round(duration_s * framerate))
    for track in tracks:
        score = track.score
        if score < (control.score_threshold or 0.0):
            continue
        sequence = track_sequence(track, width=width, height=height, framerate=framerate, tolerance=tolerance,
                                  sample_step=BRIDGED_SAMPLES)
        if not sequence:
            continue
        regions.append({
            "id": uuid.uuid4().hex[:10], "from_name": control.name, "to_name": config.image_name,
            "type": "videorectangle", "origin": "prediction", "score": score,
            "value": {"framesCount": max(frames_count, sequence[-1]["frame"]), "duration": duration_s,
                      "sequence": sequence, "labels": [track.label]},
        })
        scores.append(score)
    return {"result": regions, "score": float(np.mean(scores)) if scores else 0.0, "model_version": model_version}


class TrackedLinker:
    """`detect+track` and `concept`: each sampled frame (and its detections, in detect+track) goes to the Tracker
    deployment in order, one session per video (serve_app.models.tracker_sessions); its objects' boxes become the
    tracks."""

    def __init__(self, track, labels: tuple[str, ...], *, fps: float, phrases: tuple[str, ...] = (),
                 phrase_labels: tuple[str, ...] = ()):
        self._track, self._labels, self._fps = track, labels, fps
        self._phrases = phrases  # given: the tracker detects, and its objects' ids index these phrases
        self._phrase_labels = phrase_labels
        self._key = f"video-{uuid.uuid4().hex}"  # one session per run of a task: a retry starts a fresh one
        self._tracks: dict[int, Track] = {}
        self._frames = 0
        self.refused = 0

    async def add(self, number: int, time_s: float, pixels: np.ndarray, detections: Detections,
                  found: list[str]) -> None:
        label_ids = np.array([self._labels.index(label) for label in found], np.int64)
        try:
            tracked = await self._track(TrackStep(
                image_key=self._key, frame=self._frames, fps=self._fps, image=pixels, boxes=detections.boxes,
                scores=detections.scores, phrase_ids=label_ids, phrases=self._phrases))
        except TrackerUnavailable as exc:  # Ray re-raises the replica's exception as a subclass of it
            raise BadRequest(str(getattr(exc, "cause", exc)), status_code=503) from None
        self._frames += 1
        for younger, older in tracked.merged.items():  # one object seen as two: one track
            into = self._tracks.setdefault(older, Track(self._labels[0]))
            taken = {p.number for p in into.points}
            into.points = sorted(into.points + [p for p in self._tracks.pop(younger, Track("")).points
                                                if p.number not in taken], key=lambda p: p.number)
        for object_id, box, score, index in zip(tracked.object_ids, tracked.boxes, tracked.scores,
                                                tracked.phrase_ids):
            label = self._phrase_labels[int(index)] if self._phrases else self._labels[int(index)]
            track = self._tracks.setdefault(int(object_id), Track(label))
            track.label = label
            track.points.append(TrackPoint(number, time_s, tuple(float(v) for v in box), float(score)))
        if tracked.refused:
            self.refused += tracked.refused
            logger.warning("video %s: %d detections not tracked on frame %d: TRACKER_MAX_OBJECTS objects are live",
                           self._key, tracked.refused, number)

    async def close(self) -> None:
        """The session's end, on success, failure or cancel alike; a replica that cannot be told drops it when idle
        (TRACKER_SESSION_IDLE_S)."""
        if not self._frames:
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(self._track(TrackStep(image_key=self._key, frame=self._frames, close=True)))

    def tracks(self) -> list[Track]:
        """Every object's track (seen on two sampled frames or more, as the linker's), ordered by where it starts."""
        return sorted((t for t in self._tracks.values() if len(t.points) >= 2),
                      key=lambda t: (t.points[0].number, self._labels.index(t.label)))


async def _track_drawn_box(pipeline, request, task: dict, url: str) -> dict[str, Any]:
    """The editor's "track this box": the box drawn on one frame, carried by the Tracker VIDEO_BOX_TRACK_S seconds
    forward and as many back, as that region's new sequence (the same region id, so the editor replaces it).

    Backward, the frames before the box are decoded in order once into the task's temporary directory and fed to a
    second session last first: the model tracks back in time as it tracks forward. Memory holds one frame at a time.
    """
    if pipeline.track is None:
        raise BadRequest("tracking a box drawn on a video needs a video tracker: set TRACKER_MODEL to a SAM 2.1, "
                         "EdgeTAM or SAM 3 checkpoint (docs/video.md)")
    drawn, config, s = request.video_box, request.config, pipeline.settings
    label = drawn.label if drawn.label in config.labels else (config.labels[0] if config.labels else "object")
    async with _fetched(pipeline, request, task, url) as (directory, path, info, framerate, limits):
        at = min((drawn.frame - 1) / framerate, max(info.duration_s, 0.0))
        window = s.video_box_track_s
        size = (info.width, info.height)
        async with pipeline.memory.hold(info.width * info.height * 3 * 2):
            # back: [at - window, at], decoded in order to disk, then tracked last first
            stored = await pipeline.run_blocking(_frames_to_disk, path, limits, at, max(0.0, at - window),
                                                 directory / "frames")
            if not stored:
                raise VideoError(f"the video has no frame at frame {drawn.frame} ({at:.2f} s)")
            box = drawn.in_pixels(*size)
            back = await _track_from(pipeline, label, box, limits.track_fps,
                                     (_load_frame(p) for p in reversed(stored)))
            ahead_frames = sample_frames(path, limits, origin_s=at, start_s=at, end_s=at + window)
            try:
                ahead = await _track_from(pipeline, label, box, limits.track_fps,
                                          _skip_first(ahead_frames))
            finally:
                with contextlib.suppress(ValueError):
                    ahead_frames.close()
        first = stored[-1]
        prompt = TrackPoint(0, first.time_s, box, 1.0)
        points = [TrackPoint(-i, t, b, sc) for i, (t, b, sc) in enumerate(back, start=1)][::-1] + [prompt] + \
            [TrackPoint(i, t, b, sc) for i, (t, b, sc) in enumerate(ahead, start=1)]
        offset = -points[0].number
        track = Track(label, [TrackPoint(p.number + offset, p.time_s, p.box, p.score) for p in points])
        prediction = await pipeline.run_blocking(functools.partial(
            build_video_prediction, config, [track], width=size[0], height=size[1], framerate=framerate,
            duration_s=max(info.duration_s, 0.0), tolerance=s.video_keyframe_tolerance,
            model_version=pipeline.model_version))
        for region in prediction["result"]:
            region["id"] = drawn.region_id or region["id"]
        return prediction


@dataclass
class _StoredFrame:
    path: Path
    time_s: float


def _frames_to_disk(path: Path, limits: VideoLimits, at: float, start: float, directory: Path) -> list[_StoredFrame]:
    """The sampled frames of [start, at] (on the grid through `at`), each saved as raw pixels: read back last first."""
    directory.mkdir()
    stored = []
    frames = sample_frames(path, limits, origin_s=at, start_s=start, end_s=at)
    try:
        for frame in frames:
            file = directory / f"{frame.number:06d}.npy"
            np.save(file, frame.pixels, allow_pickle=False)
            stored.append(_StoredFrame(file, frame.time_s))
    finally:
        frames.close()
    return stored


def _load_frame(stored: _StoredFrame):
    return stored.time_s, lambda: np.load(stored.path, allow_pickle=False)


def _skip_first(frames):
    """The window ahead without its first frame (the box's own, which the backward pass starts from)."""
    next(frames, None)
    for frame in frames:
        yield frame.time_s, (lambda pixels=frame.pixels: pixels)


async def _track_from(pipeline, label: str, box, fps: float, frames) -> list[tuple[float, tuple, float]]:
    """One session: the first frame of `frames` gets the box; then each next frame, until the object has left.
    (time, box, score) per frame the object is seen, excluding the first. `frames` yields (time, pixels loader)."""
    key = f"box-{uuid.uuid4().hex}"
    seen: list[tuple[float, tuple, float]] = []
    index = 0
    try:
        for time_s, pixels in frames:
            image = await pipeline.run_blocking(pixels)
            boxes = np.array([box], np.float32) if index == 0 else np.zeros((0, 4), np.float32)
            try:
                with pipeline.stage("track"):
                    tracked = await pipeline.track(TrackStep(
                        image_key=key, frame=index, fps=fps, image=image, boxes=boxes,
                        scores=np.ones(len(boxes), np.float32), phrase_ids=np.zeros(len(boxes), np.int64)))
            except TrackerUnavailable as exc:
                raise BadRequest(str(getattr(exc, "cause", exc)), status_code=503) from None
            if index > 0 and len(tracked.object_ids):
                seen.append((time_s, tuple(float(v) for v in tracked.boxes[0]), 1.0))
            index += 1
            if not tracked.live:
                break
    finally:
        if index:
            with contextlib.suppress(Exception):
                await asyncio.shield(pipeline.track(TrackStep(image_key=key, frame=index, close=True)))
    return seen
