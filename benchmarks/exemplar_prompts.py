"""An exemplar prompt against a text prompt on the same image, the editor's way: through the real service (tiny SAM 3)
and, for the model's own cost, in-process with full-size SAM 3 random weights.

    python -m benchmarks.exemplar_prompts [--images 4] [--repeats 3] [--full-size]

Per image: a text prompt ("cats", the first on the image: the encoder runs), then `repeats` times a text prompt and
an exemplar prompt (one positive and one negative box of "cats"), each on the cached image features. Target: the
exemplar round trip at most 1.5x the text prompt's on the same image; the embedding cache hits are read from
GET /metrics. Writes benchmarks/results/exemplar-prompts-cpu.json.
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
import numpy as np

from benchmarks.harness import machine
from serve_app.tiny_models.sam3 import make_tiny_sam3_video
from tests.configs import EXEMPLAR_CONFIG, drawn_box
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
INTERACTIVE = ROOT.parent / "shared" / "fixtures" / "label-studio" / "predict_interactive.json"
EXEMPLARS = (("ex1", 10.0, ["cats"]), ("ex2", 55.0, ["cats", "NOT"]))


def body(image: str, *, exemplars: bool) -> dict:
    sent = copy.deepcopy(json.loads(INTERACTIVE.read_text())["body"])
    sent["tasks"][0]["data"]["image"] = image
    sent["label_config"] = EXEMPLAR_CONFIG
    if exemplars:
        result = [drawn_box(region_id, x, 20.0, 25.0, 40.0, labels, image_size=(640, 480))
                  for region_id, x, labels in EXEMPLARS]
    else:
        result = [{"id": "p1", "from_name": "prompt", "to_name": "image", "type": "textarea", "origin": "manual",
                   "value": {"text": ["cats"]}}]
    sent["params"]["context"] = {"result": result}
    return sent


def timed_post(client: httpx.Client, sent: dict) -> float:
    started = time.perf_counter()
    response = client.post("/predict", json=sent)
    response.raise_for_status()
    assert "errors" not in response.json(), response.text
    return time.perf_counter() - started


def through_the_service(images: int, repeats: int, work: Path) -> dict:
    env = {"DETECTOR_MODEL": str(make_tiny_sam3_video(work / "sam3", seed=1)), "BOX_THRESHOLD": "0",
           "EXEMPLAR_THRESHOLD": "0"}
    service = ServeProcess(env, work).start()
    first, text, exemplar = [], [], []
    try:
        with httpx.Client(base_url=service.url, timeout=120) as client:
            timed_post(client, body(data_url(png_bytes(pattern(480, 640, seed=99))), exemplars=False))  # warm-up
            before = service.settled_metrics()["sam_embedding_cache"]
            for i in range(images):
                image = data_url(png_bytes(pattern(480, 640, seed=i)))
                first.append(timed_post(client, body(image, exemplars=False)))
                for _ in range(repeats):
                    text.append(timed_post(client, body(image, exemplars=False)))
                    exemplar.append(timed_post(client, body(image, exemplars=True)))
            after = service.settled_metrics()["sam_embedding_cache"]  # once the replica's counts are exported
    finally:
        service.stop()
    return {"model": "tiny SAM 3 (sam3_video layout), 640x480", "first_text_prompt_s": _stats(first),
            "text_prompt_s": _stats(text), "exemplar_prompt_s": _stats(exemplar),
            "exemplar_over_text_p50": statistics.median(exemplar) / statistics.median(text),
            "cache_hits": after["hits"] - before["hits"], "cache_misses": after["misses"] - before["misses"],
            "requests_on_cached_images": len(text) + len(exemplar)}


def in_process_full_size(images: int, repeats: int) -> dict:
    import transformers as tf

    from serve_app.models.messages import DetectionRequest
    from serve_app.models.sam3_concept import Sam3Concept
    from serve_app.tiny_models.owlv2_omdet import make_tiny_clip_tokenizer

    processor = tf.Sam3Processor(image_processor=tf.Sam3ImageProcessor(),
                                 tokenizer=make_tiny_clip_tokenizer(model_max_length=32))
    model = Sam3Concept(tf.Sam3Model(tf.Sam3Config()), processor, __import__("torch").device("cpu"),
                        cache_bytes=4 << 30)
    text, exemplar, first = [], [], []
    for i in range(images):
        pixels = pattern(480, 640, seed=i)
        key = f"image-{i}"
        started = time.perf_counter()
        model.detect([DetectionRequest(image=pixels, phrases=["cats"], box_threshold=0.5, image_key=key)])
        first.append(time.perf_counter() - started)
        boxes = np.array([[64, 96, 224, 288], [352, 96, 512, 288]], np.float32)
        for _ in range(repeats):
            started = time.perf_counter()
            model.detect([DetectionRequest(image=pixels, phrases=["cats"], box_threshold=0.5, image_key=key)])
            text.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.detect([DetectionRequest(image=pixels, phrases=[""], box_threshold=0.5, image_key=key,
                                           exemplar_boxes=boxes, exemplar_labels=np.array([1, 0]),
                                           exemplar_phrases=np.array([0, 0]))])
            exemplar.append(time.perf_counter() - started)
    return {"model": "SAM 3 full size (Sam3Config defaults, 840 M parameters, random weights), 640x480, in-process",
            "first_text_prompt_s": _stats(first), "text_prompt_s": _stats(text), "exemplar_prompt_s": _stats(exemplar),
            "exemplar_over_text_p50": statistics.median(exemplar) / statistics.median(text),
            "images_encoded": model.images_encoded}


def _stats(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 4), "max": round(max(values), 4), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true", help="also in-process with full-size SAM 3")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gs-exemplars-"))
    report = {"machine": machine(), "command": "python -m benchmarks.exemplar_prompts"
              + (" --full-size" if args.full_size else ""), "service": through_the_service(args.images, args.repeats, work)}
    if args.full_size:
        report["full_size"] = in_process_full_size(min(args.images, 2), args.repeats)
    out = ROOT / "benchmarks" / "results" / "exemplar-prompts-cpu.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
