"""First click versus next click on an image, through the real service with MobileSAM at 1024 px.

    python -m benchmarks.interactive_clicks [--images 4] [--clicks 4] [--env COMPILE_ENCODERS=on] [--out F]

MobileSAM runs with the shared fixture's synthetic weights (same architecture and cost as the official
mobile_sam.pt, which cannot be downloaded here). For each of N fresh 1024x768 images: one first click
(embedding cache miss: the encoder runs) and M further clicks on the same image (cache hits: decoder
only), sent sequentially over loopback as Label Studio's labeling UI would. Target: the next click takes
at most 15 % of the first.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from serve_app.tiny_models.grounding_dino_sam import make_tiny_grounding_dino
from tests.configs import CLICK_CONFIG
from tests.imaging import data_url, pattern, png_bytes
from tests.mobile_sam_weights import save_mobile_sam_checkpoint
from tests.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
INTERACTIVE = ROOT.parent / "shared" / "fixtures" / "label-studio" / "predict_interactive.json"


def click_body(image: str, clicks: list[tuple[float, float]]) -> dict:
    body = copy.deepcopy(json.loads(INTERACTIVE.read_text())["body"])
    body["tasks"][0]["data"]["image"] = image
    body["label_config"] = CLICK_CONFIG
    body["params"]["context"] = {"result": [
        {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": True,
         "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["cats"]}} for x, y in clicks]}
    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--clicks", type=int, default=4, help="further clicks per image")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the service")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gs-clicks-"))
    env = {"GROUNDING_DINO_MODEL": str(make_tiny_grounding_dino(work / "dino")), "USE_MOBILE_SAM": "true",
           "MOBILESAM_CHECKPOINT": str(save_mobile_sam_checkpoint(work / "mobile_sam.pt")),
           **dict(item.split("=", 1) for item in args.env)}
    service = ServeProcess(env, work).start()
    first, following = [], []
    try:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            client.post("/predict", json=click_body(data_url(png_bytes(pattern(768, 1024, seed=99))), [(50, 50)]))
            for i in range(args.images):
                image = data_url(png_bytes(pattern(768, 1024, seed=i)))
                clicks: list[tuple[float, float]] = []
                for n in range(args.clicks + 1):
                    clicks.append((20.0 + 10 * n, 30.0 + 7 * n))
                    started = time.perf_counter()
                    response = client.post("/predict", json=click_body(image, clicks))
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    (first if n == 0 else following).append(elapsed)
            cache = client.get("/metrics").json()["sam_embedding_cache"]
    finally:
        service.stop()
    report = {
        "service_env": args.env,
        "first_click_median_ms": round(statistics.median(first) * 1000),
        "first_click_ms": [round(x * 1000) for x in first],
        "next_click_median_ms": round(statistics.median(following) * 1000),
        "next_click_min_max_ms": [round(min(following) * 1000), round(max(following) * 1000)],
        "next_over_first": round(statistics.median(following) / statistics.median(first), 3),
        "cache": cache,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
