"""A 500-task "Retrieve predictions" finished by a background job while a person clicks (issue 15).

    python -m benchmarks.background_retrieve [--tasks 500] [--deadline-s 5] [--models tiny]

Starts the service with LABEL_STUDIO_URL pointing at a loopback stand-in of Label Studio's `/api/predictions/`
(tests/loopback.py: it stores what the job POSTs; the real Label Studio is in the e2e tests), serves `--tasks`
distinct 320x240 images over loopback, and measures:
- click latency (a smart keypoint on one image, sent one after another as the editor does) with no job, then
  while the job runs;
- how long the Retrieve's answer took (PREDICT_DEADLINE_S), how many tasks it held, the job's tasks/s, and the
  time until every task is either in the answer or stored.
Loopback only; bounded by the task count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from benchmarks.harness import ImageServer, distinct_images, machine, retrieve_body, start_service
from benchmarks.models import MODEL_SETS, model_env
from tests.configs import CLICK_CONFIG
from tests.imaging import pattern, png_bytes
from tests.loopback import PredictionsStandIn, loopback_http

CLICK_IMAGE = "click.png"


def click_body(image_url: str, n: int) -> dict:
    body = retrieve_body([image_url])
    body["label_config"] = CLICK_CONFIG
    body["tasks"][0]["id"] = 1
    body["params"] = {"context": {"result": [
        {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "original_width": 640,
         "original_height": 480, "value": {"x": 20 + n % 50, "y": 30 + n % 40, "width": 0.5,
                                           "keypointlabels": ["cats"]}}]}}
    return body


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def summary_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(statistics.median(values) * 1000, 1),
            "p95_ms": round(percentile(values, 0.95) * 1000, 1), "max_ms": round(max(values) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--deadline-s", type=float, default=5.0)
    parser.add_argument("--idle-clicks", type=int, default=20)
    parser.add_argument("--background-concurrency", type=int, default=None,
                        help="BACKGROUND_TASK_CONCURRENCY (default: the service's auto, 2 on CPU)")
    parser.add_argument("--models", choices=MODEL_SETS, default="tiny")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    files = distinct_images(args.tasks, height=240, width=320)
    files[CLICK_IMAGE] = png_bytes(pattern(480, 640, seed=7))
    images = ImageServer(files)
    store = PredictionsStandIn()
    with loopback_http(store.handler) as label_studio:
        service = start_service({**model_env(args.models), "LABEL_STUDIO_URL": label_studio,
                                 "LABEL_STUDIO_API_KEY": store.token, "PREDICT_DEADLINE_S": str(args.deadline_s),
                                 **({"BACKGROUND_TASK_CONCURRENCY": str(args.background_concurrency)}
                                    if args.background_concurrency else {})})
        try:
            result = measure(service, images.url, store, args)
        finally:
            service.stop()
            images.close()
    result = {"scenario": "background retrieve", "models": args.models, **machine(), **result}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def measure(service, image_url: str, store: PredictionsStandIn, args) -> dict:
    clicks = 0
    with httpx.Client(base_url=service.url, timeout=120) as client:
        def click() -> float:
            nonlocal clicks
            clicks += 1
            started = time.perf_counter()
            response = client.post("/predict", json=click_body(f"{image_url}/{CLICK_IMAGE}", clicks))
            response.raise_for_status()
            assert response.json()["results"][0]["result"], response.text
            return time.perf_counter() - started

        click()  # warm: the click image's embedding is cached from here on, with or without the job
        idle = [click() for _ in range(args.idle_clicks)]

        names = sorted(name for name in distinct_images_names(args.tasks))
        body = retrieve_body([f"{image_url}/{name}" for name in names])
        answer: dict = {}
        started = time.monotonic()

        def retrieve() -> None:
            with httpx.Client(base_url=service.url, timeout=300) as retriever:
                answer["json"] = retriever.post("/predict", json=body).json()
                answer["after_s"] = time.monotonic() - started

        thread = threading.Thread(target=retrieve)
        thread.start()
        busy = []
        while thread.is_alive() or client.get("/jobs").json()["running_jobs"]:
            busy.append(click())
        thread.join()
        every_task_s = time.monotonic() - started
        results = answer["json"]["results"]
        answered = sum(1 for r in results if r)
        stored_ids = {row["task"] for row in store.rows}
        answered_ids = {1000 + i for i, r in enumerate(results) if r}
        duplicates = len(store.rows) - len(stored_ids) + len(stored_ids & answered_ids)
        jobs = client.get("/jobs").json()["jobs"]
    background = len(stored_ids)
    return {
        "tasks": args.tasks, "predict_deadline_s": args.deadline_s,
        "background_task_concurrency": args.background_concurrency or "auto (2 on CPU)",
        "answer_after_s": round(answer["after_s"], 2), "answered_tasks": answered,
        "stored_by_job": background, "missing": args.tasks - answered - background, "duplicates": duplicates,
        "failed": sum(j["tasks"]["failed"] for j in jobs),
        "every_task_done_after_s": round(every_task_s, 1),
        "job_tasks_per_s": round(background / max(1e-9, every_task_s - answer["after_s"]), 2),
        "overall_tasks_per_s": round(args.tasks / every_task_s, 2),
        "click_idle": summary_ms(idle), "click_during_job": summary_ms(busy),
    }


def distinct_images_names(count: int) -> list[str]:
    return [f"img{i:04d}.png" for i in range(count)]


if __name__ == "__main__":
    main()
