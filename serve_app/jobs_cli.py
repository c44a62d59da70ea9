"""`grounded-serve jobs`: the service's background jobs, with a progress bar each (a client of GET /jobs)."""

from __future__ import annotations

import time
from typing import Any

import httpx

BAR_WIDTH = 30


def progress_line(job: dict[str, Any]) -> str:
    tasks = job["tasks"]
    total = max(1, tasks["total"])
    settled = tasks["done"] + tasks["failed"] + tasks["cancelled"]
    filled = round(BAR_WIDTH * settled / total)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    rate = f"{job['rate_per_s']:.2f} tasks/s" if job.get("rate_per_s") else "- tasks/s"
    eta = f"{job['eta_s']:.0f} s left" if job.get("eta_s") else ""
    where = f"{job['instance']} project {job['project'] or '-'}" if job.get("instance") else \
        f"project {job['project'] or '-'}"
    return (f"{job['id']}  {where}  [{bar}] {settled}/{tasks['total']}  "
            f"{tasks['done']} done ({tasks['answered']} answered, {tasks['stored']} stored), {tasks['failed']} failed, "
            f"{tasks['pending']} pending  {job['state']}  {rate}  {eta}".rstrip())


def render(listing: dict[str, Any], failures: int = 5) -> str:
    jobs = listing.get("jobs", [])
    if not jobs:
        return "no background jobs"
    lines = []
    for job in jobs:
        lines.append(progress_line(job))
        lines.append(f"    model {job['model_version']}, started {job['started_at']}")
        if job.get("stopped_because"):
            lines.append(f"    stopped: {job['stopped_because']}")
        for failed in job.get("failed_tasks", [])[:failures]:
            lines.append(f"    task {failed['task']}: {failed['error']}")
        hidden = job["tasks"]["failed"] - min(failures, len(job.get("failed_tasks", [])))
        if hidden > 0:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(job.get("failure_kinds", {}).items(),
                                                                 key=lambda item: -item[1])[:3])
            lines.append(f"    ... and {hidden} more failed tasks (GET /jobs lists up to 100){': ' + kinds if kinds else ''}")
    return "\n".join(lines)


def run_jobs(service_url: str, *, auth: tuple[str, str] | None, watch: bool, cancel: str | None,
             interval_s: float = 2.0) -> int:
    with httpx.Client(base_url=service_url, auth=httpx.BasicAuth(*auth) if auth else None, timeout=10) as http:
        if cancel:
            response = http.delete(f"/jobs/{cancel}")
            print(response.json().get("error") or f"cancelled {cancel}")
            return 0 if response.status_code == 200 else 1
        while True:
            response = http.get("/jobs")
            if response.status_code != 200:
                print(f"the service answered HTTP {response.status_code}: {response.text[:300]}")
                return 1
            listing = response.json()
            print(render(listing), flush=True)
            if not watch or not listing.get("running_jobs"):
                return 0
            time.sleep(interval_s)
            print()
