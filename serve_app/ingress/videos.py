"""Decoding task videos with PyAV, streaming: only the frames being tracked are ever in memory.

`probe` reads the container's header (size, duration, rate, rotation) and refuses what is beyond the caps before
a frame is decoded. `sample_frames` decodes in order and yields the frames closest after each sampling instant
(every 1 / VIDEO_TRACK_FPS seconds), as RGB with the rotation metadata applied, so boxes are in the pixels the
editor shows. Every way FFmpeg can fail on hostile bytes becomes that task's VideoError.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from serve_app.ingress.errors import ImageError


class VideoError(ImageError):
    """A task's video could not be fetched, read or decoded, or is beyond a cap (422 or 413)."""


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float  # MAX_VIDEO_SECONDS
    max_pixels: int  # MAX_VIDEO_PIXELS: width x height of one frame
    max_frames: int  # MAX_VIDEO_FRAMES: frames decoded, whatever the container claims
    track_fps: float  # VIDEO_TRACK_FPS: frames tracked per second of video


@dataclass(frozen=True)
class VideoInfo:
    width: int  # as coded; frames are turned upright as decoded (rotation metadata)
    height: int
    duration_s: float
    fps: float  # the stream's average frame rate (0 when the container does not say)


@dataclass
class SampledFrame:
    number: int  # 0-based count of sampled frames
    time_s: float  # presentation time from the stream's start
    pixels: np.ndarray  # H x W x 3 uint8 RGB, rotated as displayed


@contextlib.contextmanager
def _as_video_errors():
    import av

    try:
        yield
    except VideoError:
        raise
    except av.error.InvalidDataError:
        raise VideoError("not a decodable video (FFmpeg found no valid data)") from None
    except EOFError:  # FFmpeg's AVERROR_EOF while probing: a header and nothing after it
        raise VideoError("the video ends before its first frame (empty or truncated)") from None
    except av.error.FFmpegError as exc:  # its text names the file: the temporary path says nothing to a user
        raise VideoError(f"cannot decode the video: {exc.__class__.__name__}: {exc.strerror or 'FFmpeg error'}"
                         ) from None
    except (ValueError, OverflowError, ZeroDivisionError, MemoryError) as exc:  # absurd header fields
        raise VideoError(f"cannot read the video: {exc.__class__.__name__}: {str(exc)[:200]!r}") from None


# The demuxers FFmpeg may pick. Playlists (HLS, concat) would make it open other files or URLs, and an image
# demuxer would pass a picture off as a one-frame video; neither is a video Label Studio's editor can play.
VIDEO_CONTAINERS = ("mov", "mp4", "matroska", "webm", "avi", "mpegts", "flv", "ogg", "mpeg", "asf")


def _open(path: Path):
    import av

    if path.stat().st_size == 0:
        raise VideoError("the video is empty (0 bytes)")
    options = {"format_whitelist": ",".join(VIDEO_CONTAINERS), "protocol_whitelist": "file",
               # a bounded probe: FFmpeg's own defaults (5 MB, 5 s) also decide what a malformed file costs
               "probesize": "5000000", "analyzeduration": "5000000"}
    try:
        return av.open(str(path), "r", options=options)
    except av.error.ArgumentError:  # no allowed demuxer recognised it
        raise VideoError("not a video in a supported container (MP4/MOV, Matroska/WebM, AVI, MPEG-TS/PS, FLV, "
                         "Ogg, ASF)") from None


def _stream_seconds(container, stream) -> float:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return 0.0


def probe(path: Path, limits: VideoLimits) -> VideoInfo:
    """The video's size, length and rate from its header; refused when beyond a cap or without a video stream."""
    with _as_video_errors(), _open(path) as container:
        if not container.streams.video:
            audio = " (it has only audio)" if container.streams.audio else ""
            raise VideoError(f"the file has no video stream{audio}")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width < 1 or height < 1:
            raise VideoError(f"the video stream has no frame size ({width}x{height})")
        if width * height > limits.max_pixels:
            raise VideoError(f"video frames are {width}x{height} = {width * height} pixels; the limit is "
                             f"{limits.max_pixels} (MAX_VIDEO_PIXELS)", status_code=413)
        seconds = _stream_seconds(container, stream)
        if not math.isfinite(seconds) or seconds > limits.max_seconds:
            raise VideoError(f"the video is {seconds:.0f} s long; the limit is {limits.max_seconds:g} s "
                             "(MAX_VIDEO_SECONDS)", status_code=413)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        return VideoInfo(width=width, height=height, duration_s=max(0.0, seconds), fps=fps)


def _upright(frame) -> np.ndarray:
    """RGB pixels as displayed: any pixel format converted by FFmpeg, rotation metadata applied."""
    pixels = frame.to_ndarray(format="rgb24")
    turns = (round(frame.rotation or 0) // 90) % 4  # the display matrix, counter-clockwise degrees
    return np.ascontiguousarray(np.rot90(pixels, k=turns)) if turns else pixels


def sample_frames(path: Path, limits: VideoLimits, *, origin_s: float = 0.0, start_s: float = 0.0,
                  end_s: float = math.inf) -> Iterator[SampledFrame]:
    """The frames to track, in order: for each instant origin_s + k / track_fps within [start_s, end_s] the first
    frame shown at or after it (a window around a drawn box's frame, or the whole video); a window whose first
    instant is past end_s is empty.

    Variable frame rates are handled by presentation time, not by counting frames. Raises VideoError when the
    stream holds more than MAX_VIDEO_FRAMES frames, runs past MAX_VIDEO_SECONDS, or has no frame at all."""
    step = Fraction(1) / Fraction(limits.track_fps).limit_denominator(1000)
    origin = Fraction(origin_s).limit_denominator(10**6)
    first = origin + math.ceil((Fraction(start_s).limit_denominator(10**6) - origin) / step) * step
    with _as_video_errors(), _open(path) as container:
        if not container.streams.video:
            raise VideoError("the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = None
        decoded = sampled = 0
        next_instant = max(first, Fraction(0))
        if next_instant > end_s:
            return
        for frame in container.decode(stream):
            decoded += 1
            if decoded > limits.max_frames:
                raise VideoError(f"the video has more than {limits.max_frames} frames (MAX_VIDEO_FRAMES)",
                                 status_code=413)
            if frame.pts is None or frame.time_base is None:
                seconds = Fraction(decoded - 1) / Fraction(limits.track_fps)  # no timestamps: assume the track rate
            else:
                seconds = Fraction(frame.pts) * frame.time_base
            if start is None:
                start = seconds
            seconds -= start
            if seconds > limits.max_seconds:
                raise VideoError(f"the video runs past {limits.max_seconds:g} s (MAX_VIDEO_SECONDS)", status_code=413)
            if seconds < next_instant:
                continue
            if frame.width * frame.height > limits.max_pixels:  # a stream may change size mid-way
                raise VideoError(f"a frame is {frame.width}x{frame.height}; the limit is {limits.max_pixels} pixels "
                                 "(MAX_VIDEO_PIXELS)", status_code=413)
            yield SampledFrame(number=sampled, time_s=float(seconds), pixels=_upright(frame))
            sampled += 1
            # the next instant after this frame's time: a long gap (a variable-rate stream) skips instants
            next_instant = origin + ((seconds - origin) // step + 1) * step
            if next_instant > end_s:  # the window's last instant is served: decode no further
                return
        if decoded == 0:
            raise VideoError("the video has no frames")
