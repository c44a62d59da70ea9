"""Video decoding on real files encoded with PyAV: sampling by presentation time, rotation, pixel formats, the
caps, and every kind of bad file as that task's clear error."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.ingress.videos import VideoError, VideoLimits, probe, sample_frames
from tests.imaging import pattern, png_bytes
from tests.videos import Square, audio_only, encode, no_frames, write

SQUARES = [Square("red", 40, (10, 50), (60, 0)), Square("blue", 40, (270, 50), (-60, 0))]
LIMITS = VideoLimits(max_seconds=3600, max_pixels=10**8, max_frames=10**6, track_fps=5)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write(tmp_path_factory.mktemp("video") / "clip.mp4", encode(SQUARES, seconds=4))


def test_probe_reads_the_header(clip):
    info = probe(clip, LIMITS)
    assert (info.width, info.height, info.fps) == (320, 240, 25.0)
    assert info.duration_s == pytest.approx(4.0, abs=0.05)


def test_frames_are_sampled_at_the_track_rate_by_presentation_time(clip):
    frames = list(sample_frames(clip, LIMITS))
    assert [f.number for f in frames] == list(range(20))
    assert [f.time_s for f in frames] == pytest.approx([i / 5 for i in range(20)], abs=1e-6)
    assert frames[0].pixels.shape == (240, 320, 3) and frames[0].pixels.dtype == np.uint8
    red = (np.abs(frames[5].pixels.astype(int) - (230, 30, 30)) < 60).all(axis=2)  # t = 1 s: x from 70 to 110
    columns = np.flatnonzero(red.any(axis=0))
    assert (columns[0], columns[-1] + 1) == (70, 110)


def test_a_variable_frame_rate_is_sampled_by_time_not_by_count(tmp_path):
    times = [0, 0.05, 0.3, 0.32, 0.9, 1.0, 1.45, 1.5]
    path = write(tmp_path / "vfr.mp4", encode(SQUARES, seconds=2, times=times))
    # instants 0, 0.2, 0.4, ... each take the first frame shown at or after them; a long gap skips instants
    assert [f.time_s for f in sample_frames(path, LIMITS)] == pytest.approx([0, 0.3, 0.9, 1.0, 1.45], abs=1e-6)


def test_rotation_metadata_turns_frames_upright(tmp_path):
    upright = next(sample_frames(write(tmp_path / "plain.mp4", encode(SQUARES, seconds=0.2)), LIMITS)).pixels
    turned = next(sample_frames(write(tmp_path / "rotated.mp4", encode(SQUARES, seconds=0.2, rotation=90)), LIMITS))
    assert turned.pixels.shape == (320, 240, 3)
    assert np.abs(turned.pixels.astype(int) - np.rot90(upright).astype(int)).mean() < 2  # as a phone shows it


@pytest.mark.parametrize("codec,pix_fmt", [("libx264", "yuv444p"), ("libx264", "yuv420p10le"), ("libx264", "gray"),
                                           ("libvpx-vp9", "yuv444p"), ("mpeg4", "yuv420p")])
def test_unusual_pixel_formats_decode_to_rgb(tmp_path, codec, pix_fmt):
    path = write(tmp_path / "clip.mkv", encode(SQUARES, seconds=0.4, codec=codec, pix_fmt=pix_fmt, container="matroska"))
    [first, *_] = list(sample_frames(path, LIMITS))
    assert first.pixels.shape == (240, 320, 3) and first.pixels.dtype == np.uint8
    if pix_fmt != "gray":
        assert np.abs(first.pixels[70, 30].astype(int) - (230, 30, 30)).max() < 25


def test_each_cap_is_a_413_naming_its_setting(clip):
    with pytest.raises(VideoError, match="MAX_VIDEO_PIXELS") as error:
        probe(clip, VideoLimits(3600, 320 * 240 - 1, 10**6, 5))
    assert error.value.status_code == 413
    with pytest.raises(VideoError, match="MAX_VIDEO_SECONDS") as error:
        probe(clip, VideoLimits(3, 10**8, 10**6, 5))
    assert error.value.status_code == 413
    with pytest.raises(VideoError, match="MAX_VIDEO_FRAMES") as error:
        list(sample_frames(clip, VideoLimits(3600, 10**8, 30, 5)))  # 100 frames in the file
    assert error.value.status_code == 413
    # a header that understates the length does not escape the cap: decoding checks the frames' own times
    with pytest.raises(VideoError, match="MAX_VIDEO_SECONDS"):
        list(sample_frames(clip, VideoLimits(2, 10**8, 10**6, 5)))


@pytest.mark.parametrize("name,data,message", [
    ("empty", b"", "empty"),
    ("text", b"this is not a video\n" * 200, "not a (decodable )?video"),
    ("image", None, "not a video in a supported container"),
    # a playlist would make FFmpeg open other files or URLs
    ("playlist", b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n",
     "not a (decodable )?video"),
    ("concat", b"ffconcat version 1.0\nfile /etc/passwd\n", "not a video in a supported container"),
    ("audio", None, "only audio"),
    ("no frames", None, "before its first frame"),
    ("truncated", None, "not a (decodable video|video in a supported container)"),
])
def test_bad_files_are_clear_errors(tmp_path, clip, name, data, message):
    data = {"audio": audio_only, "no frames": no_frames, "image": lambda: png_bytes(pattern(48, 64)),
            "truncated": lambda: clip.read_bytes()[: clip.stat().st_size // 2]}.get(name, lambda: data)()
    path = write(tmp_path / "bad.mp4", data)
    with pytest.raises(VideoError, match=message) as error:
        probe(path, LIMITS)
        list(sample_frames(path, LIMITS))
    assert error.value.status_code == 422
    assert str(tmp_path) not in str(error.value)  # the temporary path means nothing to a user


def test_a_ten_hour_video_is_refused_from_its_header(tmp_path):
    # two frames, ten hours apart: the container says 10 h, and nothing is decoded to find out
    path = write(tmp_path / "ten-hours.mp4", encode(SQUARES, seconds=1, times=[0.0, 36_000.0]))
    with pytest.raises(VideoError, match="36000 s long; the limit is 3600 s") as error:
        probe(path, VideoLimits(3600, 10**8, 10**6, 5))
    assert error.value.status_code == 413


def test_8k_frames_are_refused_before_decoding(tmp_path):
    path = write(tmp_path / "8k.mp4", encode([], seconds=0.04, width=7680, height=4320))
    with pytest.raises(VideoError, match="7680x4320 = 33177600 pixels; the limit is 8294400") as error:
        probe(path, VideoLimits(3600, 3840 * 2160, 10**6, 5))
    assert error.value.status_code == 413
