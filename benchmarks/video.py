"""Video tasks: memory flat with length, and frames per second searched, through the labelling pipeline in-process.

    python -m benchmarks.video [--short-s 60] [--long-s 600] [--full-size] [--device cuda] [--track-fps 10]
                               [--tracker] [--tracker-long-s 600]

Memory: the same 640x480 scene (tests/videos.py's moving squares) as a 1-minute and a 10-minute video, each
labelled in a fresh process with the null detector (serve_app.models.null_models: instant, 20 boxes a frame), so
what is measured is the service's own per-video memory: download to disk, streaming decode, frames in flight,
tracks. RSS is sampled every 10 ms while the task runs (the process's own import-time peak would hide it). Target:
the 10-minute video's peak RSS within 10 % of the 1-minute one's.

Speed: sampled frames per second end to end (decode, detect, link, keyframes) with the tiny random-weight
Grounding DINO, and with --full-size the full-size Grounding DINO (Swin-T) architecture with random weights.
With --tracker, `detect+track` too: the same two memory runs with the tiny random-weight SAM 2.1 video model as
the tracker (serve_app.models.tracker_sessions, in-process) and a one-box null detector, so what grows or not is the
tracker's session, and its frames per second.

Writes benchmarks/results/video-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import machine

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 640, 480


def scene():
    from tests.videos import Square

    return [Square("red", 80, (20, 100), (50, 0)), Square("blue", 80, (540, 200), (-50, 10)),
            Square("red", 60, (300, 380), (5, -30), shown=(1, 1e9))]


def write_video(path: Path, seconds: float, fps: int = 25) -> Path:
    from tests.videos import encode

    path.write_bytes(encode(scene(), seconds=seconds, fps=fps, width=WIDTH, height=HEIGHT))
    return path


def label_once(video: Path, detector_dir: str, track_fps: float, in_flight: int = 8, device: str = "cpu",
               tracker_dir: str = "") -> dict:
    """Runs in a fresh process: one video task through LabellingPipeline, with its peak RSS."""
    from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
    from serve_app.ingress.pipeline import LabellingPipeline, in_thread
    from serve_app.models.loading import load
    from serve_app.models.spec import ModelSpec
    from serve_app.models.catalog import DETECTOR
    from serve_app.settings import Settings
    from tests.test_video_tracks import VIDEO_CONFIG

    settings = Settings.load(env={"DEVICE": device, "VIDEO_TRACK_FPS": str(track_fps),
                                  "VIDEO_FRAMES_IN_FLIGHT": str(in_flight),
                                  "LOCAL_FILES_DOCUMENT_ROOT": str(video.parent)})
    detector = load(ModelSpec(role=DETECTOR, checkpoint=detector_dir, setting="DETECTOR_MODEL", device=device))
    fetcher = ImageFetcher(ImageSourcePolicy(max_bytes=10**9, timeout_s=60, max_pixels=10**8,
                                             document_root=str(video.parent)))
    track = None
    if tracker_dir:
        from serve_app.models.catalog import TRACKER
        from serve_app.models.tracker_sessions import TrackerSessions

        sessions = TrackerSessions(load(ModelSpec(TRACKER, tracker_dir, "TRACKER_MODEL", device=device)))

        async def track(step):
            return await asyncio.to_thread(sessions.step, step)

    pipeline = LabellingPipeline(settings=settings, model_version="bench", detect=in_thread(detector.detect),
                                 segment=None, fetcher=fetcher, track=track)
    import gc
    import threading

    import psutil

    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    peak, running = [before], [True]

    def sample() -> None:  # the process's resident memory every 10 ms while the task runs
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    response = asyncio.run(pipeline.predict({"tasks": [{"id": 1, "data": {"video": str(video)}}],
                                             "label_config": VIDEO_CONFIG}))
    elapsed = time.perf_counter() - started
    running[0] = False
    sampler.join()
    assert "task_errors" not in response, response.get("task_errors")
    regions = response["results"][0]["result"]
    keyframes = sum(len(r["value"]["sequence"]) for r in regions)
    frames = int(round(regions[0]["value"]["duration"] * track_fps)) if regions else 0
    return {"seconds": elapsed, "peak_rss_mb": peak[0] / 2**20, "rss_before_task_mb": before / 2**20,
            "task_growth_mb": (peak[0] - before) / 2**20, "tracks": len(regions), "keyframes": keyframes,
            "sampled_frames": frames, "frames_per_s": round(frames / elapsed, 2) if elapsed else None,
            "answer_bytes": len(json.dumps(response))}


def in_fresh_process(video: Path, detector_dir: str, track_fps: float, in_flight: int = 8,
                     device: str = "cpu", tracker_dir: str = "") -> dict:
    code = ("import json, sys; from pathlib import Path; from benchmarks.video import label_once; "
            "print(json.dumps(label_once(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), "
            "sys.argv[5], sys.argv[6])))")
    out = subprocess.run([sys.executable, "-c", code, str(video), detector_dir, str(track_fps), str(in_flight),
                          device, tracker_dir], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _full_size_sam2_video(out_dir: Path) -> Path:
    """facebook/sam2.1-hiera-tiny's video model as the hub's config.json sizes it, random weights, saved with its
    processor the way the hub's is."""
    import transformers as tf

    from benchmarks.model_table import SAM2_SIZES

    tf.Sam2VideoModel(tf.Sam2VideoConfig(**SAM2_SIZES["sam2.1-hiera-tiny"])).eval().save_pretrained(out_dir)
    tf.Sam2VideoProcessor(image_processor=tf.Sam2ImageProcessor(),
                          video_processor=tf.Sam2VideoVideoProcessor()).save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short-s", type=float, default=60)
    parser.add_argument("--long-s", type=float, default=600)
    parser.add_argument("--track-fps", type=float, default=2)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the detector of the speed runs runs")
    parser.add_argument("--tracker", action="store_true", help="also detect+track with the tiny SAM 2.1 tracker")
    parser.add_argument("--tracker-long-s", type=float, default=600)
    parser.add_argument("--out", default="", help="the JSON's path (default benchmarks/results/video-<device>.json)")
    args = parser.parse_args()

    from serve_app.tiny_models.grounding_dino_sam import make_tiny_models
    from serve_app.tiny_models.null import make_null_models

    work = Path(tempfile.mkdtemp(prefix="video-bench-"))
    null = str(make_null_models(work / "null")["null_detector"])
    tiny = str(make_tiny_models(work / "tiny")["grounding_dino"])
    short = write_video(work / "short.mp4", args.short_s)
    long = write_video(work / "long.mp4", args.long_s)
    results = {"machine": machine(), "command": " ".join(["python -m benchmarks.video", *sys.argv[1:]]),
               "resolution": f"{WIDTH}x{HEIGHT}", "track_fps": args.track_fps,
               "file_mb": {"short": short.stat().st_size / 2**20, "long": long.stat().st_size / 2**20}}
    results["memory"] = {"short": in_fresh_process(short, null, args.track_fps),
                         "long": in_fresh_process(long, null, args.track_fps)}
    growth = results["memory"]["long"]["peak_rss_mb"] / results["memory"]["short"]["peak_rss_mb"] - 1
    results["memory"]["long_over_short"] = round(growth, 4)
    # In-process there is no batcher: each frame in flight would be a forward pass of its own thread, which on
    # a CPU is oversubscription (and a model's activations per frame), so the speed runs take frames one by one,
    # as one CPU replica does
    # On a GPU several frames in flight are what the Detector deployment would batch; in-process they overlap
    in_flight = 1 if args.device == "cpu" else 8
    results["speed"] = {"tiny Grounding DINO": in_fresh_process(short, tiny, args.track_fps, in_flight, args.device)}
    if args.full_size:
        from benchmarks.models import _full_size_dino

        results["speed"]["full-size Grounding DINO"] = in_fresh_process(
            write_video(work / "ten.mp4", 10), str(_full_size_dino()), args.track_fps, in_flight, args.device)
    if args.tracker:
        from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family

        one_box = str(make_null_models(work / "one-box", boxes=1)["null_detector"])
        tracker = str(make_tiny_sam_family(work / "sam2.1-video", "sam2_video"))
        tracker_long = write_video(work / "tracker-long.mp4", args.tracker_long_s)
        short_run = in_fresh_process(short, one_box, args.track_fps, 1, args.device, tracker)
        long_run = in_fresh_process(tracker_long, one_box, args.track_fps, 1, args.device, tracker)
        results["detect+track"] = {
            "tracker": "tiny random-weight SAM 2.1 video (512 px), null detector with one box a frame",
            "short": short_run, "long": long_run, "long_s": args.tracker_long_s,
            "long_over_short": round(long_run["peak_rss_mb"] / short_run["peak_rss_mb"] - 1, 4)}
        if args.full_size:  # the hub's smallest SAM 2.1 (hiera-tiny, 1024 px), random weights, on a 10 s video
            results["detect+track"]["full-size SAM 2.1 hiera-tiny video"] = in_fresh_process(
                write_video(work / "ten-tracked.mp4", 10), one_box, args.track_fps, 1, args.device,
                str(_full_size_sam2_video(work / "sam2.1-hiera-tiny-video")))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"video-{args.device}.json"
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
