"""A background job storing N predictions in a real Label Studio: in bulk, or one call per prediction (issue 28).

    python -m benchmarks.job_writes [--tasks 1000] [--modes bulk,per-task] [--hang-up]

Starts Label Studio 1.23 (tests/label_studio.py, sqlite, 127.0.0.1) and, per mode, the service on the tiny models
with LABEL_STUDIO_URL and the legacy key, PREDICT_DEADLINE_S=1 (nearly every task is background work), and
WRITE_BATCH_TASKS=50 ("bulk") or 1 ("per-task": one POST /api/predictions/ each). A project of `--tasks` tiny
distinct images served over loopback; one "Retrieve predictions" through Label Studio's API. Measured from the
Retrieve until GET /jobs shows no running job: wall time, Label Studio's prediction-writing requests (its access
log), CPU seconds of Label Studio's process tree and of the service's processes. Then every task must hold exactly
one prediction of the service's model version.

`--hang-up`: Label Studio's ML_TIMEOUT_PREDICT=5 with PREDICT_DEADLINE_S=30 (it hangs up first, with tasks running),
the scenario of issue 28; GET /jobs is checked to add up at every poll. Loopback only; bounded by the task count.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from label_studio_sdk import LabelStudio as LabelStudioClient

from benchmarks.harness import ImageServer, distinct_images, machine, session_processes, start_service
from tests.configs import SEED_CONFIG
from tests.label_studio import LEGACY_TOKEN, LabelStudio

# Label Studio's dev server logs each request twice (two handlers): a request is a distinct timestamped line
WRITE_CALLS = re.compile(r'^\[([^]]+)\].*"POST /api/(predictions/|projects/\d+/import/predictions)', re.MULTILINE)


def write_calls(log: str) -> int:
    return len(set(WRITE_CALLS.findall(log)))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for proc in [process, *process.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def service_cpu(service) -> float:
    """CPU seconds of `serve run` and every process of its session (Ray's, the replicas)."""
    total = 0.0
    for proc in session_processes(service, ("cpu_times",)):
        times = proc.info["cpu_times"]
        total += (times.user + times.system) if times else 0.0
    return total


def run_mode(mode: str, ls: LabelStudio, images: ImageServer, n: int, tiny: dict, hang_up: bool) -> dict:
    client = LabelStudioClient(base_url=ls.url, api_key=LEGACY_TOKEN)
    project = client.projects.create(title=f"writes {mode}", label_config=SEED_CONFIG)
    client.projects.import_tasks(project.id, request=[{"image": f"{images.url}/{mode}-{i}.png"} for i in range(n)])
    env = {"GROUNDING_DINO_MODEL": str(tiny["grounding_dino"]), "USE_SAM": "true", "SAM_CHECKPOINT": str(tiny["sam"]),
           "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN,
           "PREDICT_DEADLINE_S": "30" if hang_up else "1", "WRITE_BATCH_TASKS": "1" if mode == "per-task" else "50"}
    service = start_service(env)
    try:
        client.ml.create(project=project.id, url=service.url, is_interactive=False, title=mode)
        version = httpx.get(f"{service.url}/health").json()["model_version"]
        log_before = write_calls(ls.log_path.read_text(errors="replace"))
        ls_cpu, svc_cpu = cpu_seconds([ls.process.pid]), service_cpu(service)
        started = time.monotonic()
        try:
            client.actions.create(id="retrieve_tasks_predictions", project=project.id,
                                  selected_items={"all": True, "excluded": []})
        except Exception as exc:  # noqa: BLE001 - with --hang-up Label Studio reports its own timeout
            print(f"{mode}: the Retrieve call ended with {exc.__class__.__name__}")
        answered_s = time.monotonic() - started
        polls, not_adding_up = 0, 0
        while True:
            listing = httpx.get(f"{service.url}/jobs", timeout=30).json()
            polls += 1
            for job in listing["jobs"]:
                t = job["tasks"]
                not_adding_up += t["done"] + t["failed"] + t["cancelled"] + t["pending"] != t["total"]
            if listing["jobs"] and not listing["running_jobs"]:
                break
            if time.monotonic() - started > 3600:
                raise RuntimeError(f"{mode}: the job did not finish in an hour: {listing}")
            time.sleep(1)
        wall_s = time.monotonic() - started
        ls_cpu, svc_cpu = cpu_seconds([ls.process.pid]) - ls_cpu, service_cpu(service) - svc_cpu
        calls = write_calls(ls.log_path.read_text(errors="replace")) - log_before
        counts: dict[int, int] = {}
        for task in client.tasks.list(project=project.id, fields="all"):
            counts[task.id] = sum(1 for p in (task.predictions or []) if getattr(p, "model_version", None) == version
                                  or (isinstance(p, dict) and p.get("model_version") == version))
        [job] = listing["jobs"]
        return {"mode": mode, "tasks": n, "retrieve_answered_s": round(answered_s, 1), "wall_s": round(wall_s, 1),
                "label_studio_write_calls": calls, "label_studio_cpu_s": round(ls_cpu, 1),
                "service_cpu_s": round(svc_cpu, 1), "job": job["tasks"], "job_state": job["state"],
                "polls": polls, "polls_not_adding_up": not_adding_up,
                "tasks_with_exactly_one_prediction": sum(1 for c in counts.values() if c == 1),
                "tasks_with_none": sum(1 for c in counts.values() if c == 0),
                "tasks_with_more": sum(1 for c in counts.values() if c > 1)}
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--modes", default="bulk,per-task")
    parser.add_argument("--hang-up", action="store_true", help="ML_TIMEOUT_PREDICT=5, PREDICT_DEADLINE_S=30")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from serve_app.tiny_models.grounding_dino_sam import make_tiny_models

    work = Path(tempfile.mkdtemp(prefix="gs-bench-writes-"))
    tiny = make_tiny_models(work / "models")
    pictures = list(distinct_images(args.tasks, height=48, width=64).values())
    images = ImageServer({f"{mode}-{i}.png": png for mode in args.modes.split(",") for i, png in enumerate(pictures)})
    ls = LabelStudio(work, extra_env={"ML_TIMEOUT_PREDICT": "5"} if args.hang_up else {}).start()
    try:
        results = [run_mode(mode, ls, images, args.tasks, tiny, args.hang_up) for mode in args.modes.split(",")]
    finally:
        ls.stop()
        images.close()
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": machine(), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
