"""Screenshots of Label Studio's editor showing a predicted video track at two frames (docs/video.md).

    .venv/bin/pip install -e ".[docs]"   # Playwright's Python client; the browser is Debian's chromium package
    .venv/bin/python scripts/video_screenshots.py [--out docs/images]

Starts a real Label Studio 1.23 (scripts/install-label-studio) on 127.0.0.1, uploads a video of moving squares,
stores the tracks the labelling pipeline computes for it (the colour detector of tests/videos.py stands in for
trained weights, so the boxes land on the objects), then opens the task in headless Chromium, seeks the editor to
two frames and saves a screenshot of each, with the box positions the editor drew read from its own store.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy  # noqa: E402
from serve_app.ingress.pipeline import LabellingPipeline, in_thread  # noqa: E402
from serve_app.settings import Settings  # noqa: E402
from tests.label_studio import LEGACY_TOKEN, PASSWORD, USERNAME, LabelStudio  # noqa: E402
from tests.test_label_studio_e2e import upload_files  # noqa: E402
from tests.test_video_tracks import VIDEO_CONFIG  # noqa: E402
from tests.videos import ColourDetector, Square, encode  # noqa: E402

WIDTH, HEIGHT, SECONDS = 640, 360, 5
SQUARES = [Square("red", 70, (20, 100), (110, 0)), Square("blue", 70, (550, 200), (-100, -10), shown=(0, 4))]
FRAMES = (11, 76)  # 0.4 s and 3.0 s at the config's 25 fps
# the labels drawn in colours other than the squares' own, so the predicted boxes show on them
CONFIG = VIDEO_CONFIG.replace('background="red"', 'background="#00c853"').replace('background="blue"',
                                                                                 'background="#ff9100"')
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def predicted_tracks(video: bytes) -> dict:
    settings = Settings.load(env={"DEVICE": "cpu", "VIDEO_TRACK_FPS": "5"})
    pipeline = LabellingPipeline(settings=settings, model_version="grounded-serve:screenshots",
                                 detect=in_thread(ColourDetector().detect), segment=None,
                                 fetcher=ImageFetcher(ImageSourcePolicy(max_bytes=10**8, timeout_s=5, max_pixels=10**8)))
    body = {"tasks": [{"id": 1, "data": {"video": "data:video/mp4;base64," + base64.b64encode(video).decode()}}],
            "label_config": VIDEO_CONFIG}
    return asyncio.run(pipeline.predict(body))["results"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    video = encode(SQUARES, seconds=SECONDS, width=WIDTH, height=HEIGHT)
    prediction = predicted_tracks(video)
    work = Path(tempfile.mkdtemp(prefix="ls-screens-"))
    studio = LabelStudio(work).start()
    try:
        headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
        project = httpx.post(f"{studio.url}/api/projects", headers=headers,
                             json={"title": "video tracks", "label_config": CONFIG}).json()
        [task_id] = upload_files(studio.url, headers, project["id"], {"file0": ("squares.mp4", video, "video/mp4")})
        httpx.post(f"{studio.url}/api/predictions/", headers=headers, json={
            "task": task_id, "result": prediction["result"], "score": prediction["score"],
            "model_version": prediction["model_version"]}).raise_for_status()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{studio.url}/user/login/")
            page.fill("input[name=email]", USERNAME)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{studio.url}/projects/{project['id']}/data?task={task_id}")
            page.wait_for_function("() => window.Htx && window.Htx.annotationStore && "
                                   "window.Htx.annotationStore.predictions.length > 0", timeout=60_000)
            page.evaluate("() => { const s = window.Htx.annotationStore; s.selectPrediction(s.predictions[0].id); }")
            # the editor knows the video's length once its <video> has loaded the file's metadata
            page.wait_for_function("() => window.Htx.annotationStore.selected.names.get('video').length > 1",
                                   timeout=60_000)
            shown = {}
            for frame in FRAMES:
                page.evaluate(f"() => window.Htx.annotationStore.selected.names.get('video').setFrame({frame})")
                page.wait_for_function(f"() => window.Htx.annotationStore.selected.names.get('video').frame === {frame}")
                page.wait_for_timeout(800)  # the video element paints the sought frame
                shown[frame] = page.evaluate("""(frame) => window.Htx.annotationStore.selected.regionStore.regions
                    .filter(r => r.type === 'videorectangleregion' && r.isInLifespan(frame))
                    .map(r => ({label: r.labels && r.labels[0], box: r.getShape(frame)}))""", frame)
                page.screenshot(path=str(args.out / f"video-track-frame-{frame}.png"))
            browser.close()
        (args.out / "video-track-frames.json").write_text(json.dumps(shown, indent=2))
        print(json.dumps(shown, indent=2))
    finally:
        studio.stop()


if __name__ == "__main__":
    main()
