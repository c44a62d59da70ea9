"""Issue 14 item 11, replayed: a burst of hostile requests against the service while it runs a 16-task
"Retrieve predictions" on full-size models, then /health every 3 s for two minutes and one more /predict.

    python -m benchmarks.hostile_burst [full-vit_t|full-vit_b|tiny]

Prints one JSON report: the burst's status codes, the long request's status and seconds, /health samples
(status, seconds) and the status of a /predict after it all. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import copy
import json
import sys
import threading
import time

import httpx

from benchmarks.harness import ImageServer, distinct_images, retrieve_body, start_service
from benchmarks.models import model_env


def main() -> None:
    env = {**model_env(sys.argv[1] if len(sys.argv) > 1 else "full-vit_t"), "MAX_DETECTIONS": "10"}
    files = distinct_images(17)
    names = sorted(files)
    images = ImageServer(files)
    service = start_service(env)
    url = service.url
    report = {}
    try:
        body = retrieve_body([f"{images.url}/{n}" for n in names[:16]])
        long_result = {}
        def long():
            started = time.monotonic()
            try:
                r = httpx.post(f"{url}/predict", json=body, timeout=300)
                long_result.update(status=r.status_code, s=time.monotonic() - started)
            except Exception as exc:
                long_result.update(error=repr(exc), s=time.monotonic() - started)
        t = threading.Thread(target=long); t.start()
        time.sleep(8)
        deep = b"[" * 100_000 + b"]" * 100_000
        one = retrieve_body([f"{images.url}/{names[16]}"])
        wrong = copy.deepcopy(one)
        wrong["params"] = {"context": {"result": [{"type": "number", "from_name": "box_threshold",
                                                   "value": {"number": [0.1]}}]}}
        burst = [("/predict", deep), ("/predict", b'{"tasks": [{"id": ' + b"9" * 5000 + b'}]}'),
                 ("/predict", json.dumps(wrong).encode()), ("/webhook", b'{"action": "\\ud800"}'),
                 ("/webhook", b'{"action": "ANNOTATION_CREATED"}'), ("/webhook", b'{"action": "START_TRAINING"}')]
        codes = []
        for path, content in burst:
            try:
                response = httpx.post(f"{url}{path}", content=content, timeout=30,
                                      headers={"Content-Type": "application/json"})
                codes.append((path, response.status_code))
            except Exception as exc:
                codes.append((path, repr(exc)[:80]))
        try:
            codes.append(("/metrics", httpx.get(f"{url}/metrics", timeout=30).status_code))
        except Exception as exc:
            codes.append(("/metrics", repr(exc)[:80]))
        report["burst"] = codes
        health = []
        for _ in range(40):
            started = time.monotonic()
            try:
                health.append((httpx.get(f"{url}/health", timeout=5).status_code, round(time.monotonic() - started, 2)))
            except Exception as exc:
                health.append((repr(exc)[:40], round(time.monotonic() - started, 2)))
            time.sleep(3)
        t.join(timeout=200)
        report["long"] = long_result
        report["health"] = health
        try:
            r = httpx.post(f"{url}/predict", json=one, timeout=200)
            report["after"] = r.status_code
        except Exception as exc:
            report["after"] = repr(exc)[:80]
    finally:
        service.stop(); images.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
