"""Memory of the whole service, every process of it, next to the single-process seed backend's.

    python -m benchmarks.memory [--models full-vit_t] [--tasks 4] [--out FILE]

Both sides load the same models and answer the same "Retrieve predictions" first, so buffers that grow on the
first request are counted. Per process: RSS, and PSS (proportional set size: a page shared by n processes counts
1/n in each, so the PSS of all processes adds up to the memory really used; RSS counts shared library and
fork-shared pages once per process). Processes are grouped by role from their command lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import psutil

from benchmarks.harness import (ImageServer, distinct_images, long_requests, machine, retrieve_body, run_load,
                                seed_backend, start_service)
from benchmarks.models import MODEL_SETS, model_env

ROLES = [  # (substring of the command line, role), first match wins
    ("ServeReplica", None),  # named by deployment below
    ("ServeController", "Serve controller"),
    ("ProxyActor", "Serve HTTP proxy"),
    ("dashboard/agent.py", "dashboard agent (metrics export)"),
    ("runtime_env/agent", "runtime env agent"),
    ("dashboard/dashboard.py", "dashboard head"),
    ("ray-dashboard-", "dashboard modules"),
    ("gcs_server", "GCS"),
    ("raylet", "raylet"),
    ("log_monitor", "log monitor"),
    ("monitor.py", "autoscaler monitor"),
    ("default_worker.py", "idle Ray workers"),
    ("serve run", "serve run (driver)"),
    ("scripts.py run", "serve run (driver)"),
]


def role_of(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    for needle, role in ROLES:
        if needle in text:
            if role is None:
                return "replica " + text.split(":")[-1].split(" ")[0].split(".")[0]
            return role
    return "other: " + os.path.basename(cmdline[0]) if cmdline else "other"


def memory_of(pids: list[int]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            full = proc.memory_full_info()
            role = role_of(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        group = groups.setdefault(role, {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0})
        group["processes"] += 1
        group["rss_mb"] += full.rss / 1e6
        group["pss_mb"] += getattr(full, "pss", full.rss) / 1e6
    return {role: {k: round(v) for k, v in g.items()} for role, g in sorted(groups.items())}


def totals(groups: dict[str, dict[str, float]]) -> dict[str, int]:
    return {key: sum(g[key] for g in groups.values()) for key in ("processes", "rss_mb", "pss_mb")}


def seed_memory(env: dict[str, str], body: dict) -> dict:
    with seed_backend(env) as (pid, url):
        run_load(url, body, requests=1, concurrency=1)
        groups = memory_of([pid])
        return {"seed backend": groups[next(iter(groups))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=MODEL_SETS, default="full-vit_t")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    env = {**model_env(args.models), "SAM_EMBEDDING_CACHE_BYTES": "0", "TASK_TIMEOUT_S": "3000",
           "PREDICT_DEADLINE_S": "3000"}
    images = ImageServer(distinct_images(args.tasks))
    body = retrieve_body([f"{images.url}/{name}" for name in sorted(images.files)])
    try:
        seed = seed_memory(env, body)

        service = start_service(env, long_requests)
        try:
            run_load(service.url, body, requests=1, concurrency=1)
            time.sleep(5)  # metrics export and idle workers settle
            pids = [p.pid for p in psutil.process_iter() if _in_session(p.pid, service.process.pid)]
            groups = memory_of(pids)
        finally:
            service.stop()
    finally:
        images.close()
    service_total, seed_total = totals(groups), totals(seed)
    result = {"benchmark": "memory", "models": args.models, "tasks": args.tasks, **machine(),
              "service": groups, "service_total": service_total, "seed": seed, "seed_total": seed_total,
              "ratio_rss": round(service_total["rss_mb"] / seed_total["rss_mb"], 2),
              "ratio_pss": round(service_total["pss_mb"] / seed_total["pss_mb"], 2)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _in_session(pid: int, session: int) -> bool:
    try:
        return os.getsid(pid) == session
    except OSError:
        return False


if __name__ == "__main__":
    main()
