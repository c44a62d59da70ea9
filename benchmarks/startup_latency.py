"""Start-up time, memory and single-request latency of `serve run configs/serve.yaml` on tiny models.

    python -m benchmarks.startup_latency [--requests 20]

Starts the real service on a free loopback port (tiny random-weight models, SAM on), measures
time to first /health and until both model deployments serve, sums the RSS of every process the
service started, then sends bounded sequential /predict requests from this process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.harness import service_processes
from serve_app.tiny_models.grounding_dino_sam import make_tiny_models
from tests.imaging import data_url, pattern, png_bytes
from tests.serve_process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
INTERACTIVE = ROOT.parent / "shared" / "fixtures" / "label-studio" / "predict_interactive.json"


def service_rss(process: ServeProcess) -> dict[str, float]:
    """RSS in MB by process title, over `serve run` and every process in its session (Ray's included)."""
    totals: dict[str, float] = {}
    for cmdline, mb in service_processes(process):
        title = cmdline[0].split("/")[-1]
        if title in ("python", "python3"):
            title = " ".join(cmdline[1:3])[-60:]
        totals[title] = totals.get(title, 0.0) + mb
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    models = make_tiny_models(work / "models")
    env = {"GROUNDING_DINO_MODEL": str(models["grounding_dino"]), "USE_SAM": "true", "SAM_CHECKPOINT": str(models["sam"])}
    service = ServeProcess(env, work)
    started = time.monotonic()
    first_health = None

    def ready(health):
        nonlocal first_health
        first_health = first_health or time.monotonic() - started
        return all(health["models_ready"].values())

    service.start(ready=ready)
    try:
        body = json.loads(INTERACTIVE.read_text())["body"]
        body["tasks"][0]["data"]["image"] = data_url(png_bytes(pattern(480, 640, seed=1)))
        body["params"]["context"]["result"][0]["value"]["text"] = ["cats. house"]
        latencies = []
        with httpx.Client(base_url=service.url, timeout=120) as client:
            for _ in range(args.requests):
                t0 = time.perf_counter()
                response = client.post("/predict", json=body)
                latencies.append(time.perf_counter() - t0)
                response.raise_for_status()
            regions = len(response.json()["results"][0]["result"])
        rss = service_rss(service)
    finally:
        service.stop()

    report = {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "first_health_s": round(first_health, 1),
        "models_ready_s": round(service.startup_s, 1),
        "rss_total_mb": round(sum(rss.values())),
        "rss_mb": {k: round(v) for k, v in sorted(rss.items(), key=lambda kv: -kv[1])},
        "predict_cold_ms": round(latencies[0] * 1000),
        "predict_warm_median_ms": round(statistics.median(latencies[1:]) * 1000),
        "predict_warm_min_ms": round(min(latencies[1:]) * 1000),
        "predict_warm_max_ms": round(max(latencies[1:]) * 1000),
        "regions_per_response": regions,
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
