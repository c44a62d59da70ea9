"""What every benchmark scenario shares: start the service from configs/serve.yaml, drive load from a
separate process, and read batch sizes and memory per replica."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from tests.serve_process import ServeProcess, model_deployments

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "benchmarks" / "requests"  # bodies Label Studio sent, kept here so gpu.sh needs only the repo


def machine() -> dict[str, Any]:
    import torch
    import transformers

    try:
        import ray
    except ImportError:  # the in-process benchmarks run without Ray
        ray = None

    return {
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "ray": ray.__version__ if ray else None, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": [round(x, 2) for x in psutil.getloadavg()],
    }


def ls_body(name: str) -> dict[str, Any]:
    return copy.deepcopy(json.loads((FIXTURES / name).read_text())["body"])


def text_prompt_body(image_url: str, prompt: str = "cats. house") -> dict[str, Any]:
    """One task with a typed prompt: what the labeling UI sends."""
    body = ls_body("predict_interactive.json")
    body["tasks"][0]["data"]["image"] = image_url
    body["params"]["context"]["result"][0]["value"]["text"] = [prompt]
    return body


def without_masks(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with the BrushLabels tag removed: boxes only, so SAM is not called."""
    body = copy.deepcopy(body)
    body["label_config"] = re.sub(r"<BrushLabels.*?</BrushLabels>", "", body["label_config"], flags=re.S)
    return body


def retrieve_body(image_urls: list[str]) -> dict[str, Any]:
    """"Retrieve predictions" on a selection of tasks: labels from the config are the prompt."""
    body = ls_body("predict_batch.json")
    template = body["tasks"][0]
    body["tasks"] = [{**copy.deepcopy(template), "id": 1000 + i, "data": {"image": url}}
                     for i, url in enumerate(image_urls)]
    return body


def distinct_images(count: int, height: int = 480, width: int = 640) -> dict[str, bytes]:
    """`count` different PNG pictures, so no request reuses another's image (or its cached embedding)."""
    from tests.imaging import pattern, png_bytes

    return {f"img{i:04d}.png": png_bytes(pattern(height, width, seed=1000 + i)) for i in range(count)}


def user_config(max_batch_size: int | None = None,
                batch_wait_timeout_s: float | None = None) -> Callable[[dict], None]:
    """A serve.yaml override for both model deployments; None keeps the file's value."""
    def override(config: dict) -> None:
        for deployment in model_deployments(config):
            if max_batch_size is not None:
                deployment["user_config"]["max_batch_size"] = max_batch_size
            if batch_wait_timeout_s is not None:
                deployment["user_config"]["batch_wait_timeout_s"] = batch_wait_timeout_s
    return override


# Set by `allocate_like_the_replicas` to the GLIBC_TUNABLES this benchmark was started with.
OUTER_TUNABLES = "BENCH_OUTER_GLIBC_TUNABLES"


def python_path() -> str:
    """PYTHONPATH for a child process: the repository first, then what this one was given (a GPU machine's
    bundle installed with `pip --target`)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def allocate_like_the_replicas(module: str, env: dict[str, str]) -> None:
    """Re-run this benchmark (`python -m module`) under the malloc tunables the service's model replicas start with
    (MODEL_MALLOC_REUSE, serve_app.deployments.replica_memory), so an in-process reference runs the same allocator as the
    replicas it is compared with. glibc reads its tunables only when a process starts."""
    from serve_app.deployments.replica_memory import replica_env
    from serve_app.settings import Settings

    outer = os.environ.get(OUTER_TUNABLES, os.environ.get("GLIBC_TUNABLES", ""))
    wanted = replica_env(Settings.load(env={**os.environ, **env}).model_malloc_reuse, inherited=outer)
    if wanted and os.environ.get("GLIBC_TUNABLES") != wanted["GLIBC_TUNABLES"]:
        os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]],
                  {**os.environ, **wanted, OUTER_TUNABLES: outer})


def start_service(env: dict[str, str], override: Callable[[dict], None] | None = None,
                  startup_timeout_s: float = 600) -> ServeProcess:
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    if OUTER_TUNABLES in os.environ:  # the service's other processes start as they would without the benchmark
        env = {"GLIBC_TUNABLES": os.environ[OUTER_TUNABLES], **env}
    service = ServeProcess({"IMAGE_HOST_ALLOWLIST": "127.0.0.1", **env}, work, config_overrides=override,
                           startup_timeout_s=startup_timeout_s, remove_workdir=True)
    return service.start()


def long_requests(config: dict) -> None:
    """serve.yaml override: a full-size Retrieve on CPU takes minutes, past Serve's 95 s request timeout."""
    config["http_options"]["request_timeout_s"] = 3000


@contextlib.contextmanager
def seed_backend(env: dict[str, str]):
    """benchmarks.seed_backend in its own process on a free loopback port: yields (pid, url)."""
    import httpx

    from tests.serve_process import free_port

    port = free_port()
    outer = {"GLIBC_TUNABLES": os.environ[OUTER_TUNABLES]} if OUTER_TUNABLES in os.environ else {}
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.seed_backend", "--port", str(port)], cwd=ROOT,
                               env={**os.environ, **outer, **env, "PYTHONPATH": python_path()},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the seed backend did not start") from None
                time.sleep(1)
        yield process.pid, url
    finally:
        process.terminate()
        process.wait(30)


def run_load(url: str, body: dict[str, Any] | list[dict[str, Any]], requests: int, concurrency: int,
             timeout_s: float = 600) -> dict:
    """benchmarks.load in its own process; returns its JSON report. A list of bodies is sent round robin."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(body, handle)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.load", "--url", f"{url}/predict", "--body", handle.name,
             "--requests", str(requests), "--concurrency", str(concurrency), "--timeout-s", str(timeout_s)],
            cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": python_path()})
    finally:
        os.unlink(handle.name)
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_sizes(service: ServeProcess, until=None) -> dict[str, dict[str, int]]:
    """Items by the size of the batch they ran in, per model deployment, as the deployments recorded them
    (read back from Prometheus): once `until(histograms)` holds, or else once two reads seconds apart agree."""
    def histograms(snapshot: dict) -> dict[str, dict[str, int]]:
        return {name: dict(h["items_by_batch_size"]) for name, h in snapshot.get("batch_sizes", {}).items()}

    if until is not None:
        snapshot = service.metrics(until=lambda snapshot: until(histograms(snapshot)))
        if until(histograms(snapshot)):
            return histograms(snapshot)
    return histograms(service.settled_metrics())


class BatchCounter:
    """Batch sizes formed since the last call. Given how many items each deployment was sent, a call returns as
    soon as that many are exported (about Ray's metrics interval); without, once /metrics settles (seconds)."""

    def __init__(self, service: ServeProcess):
        self.service = service
        self.last = batch_sizes(service)

    def since_last(self, items: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
        def counted(now: dict[str, dict[str, int]]) -> bool:
            delta = histogram_delta(self.last, now)
            return all(sum(delta.get(name, {}).values()) >= n for name, n in items.items())

        now = batch_sizes(self.service, until=counted if items else None)
        delta, self.last = histogram_delta(self.last, now), now
        return delta


def histogram_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    delta = {}
    for name, histogram in after.items():
        previous = before.get(name, {})
        counts = {size: n - previous.get(size, 0) for size, n in histogram.items()}
        delta[name] = {size: n for size, n in sorted(counts.items(), key=lambda kv: int(kv[0])) if n}
    return delta


def session_processes(service: ServeProcess, attrs: tuple[str, ...] = ("pid",)):
    """`serve run` and every process in its session, Ray's included (psutil processes with `attrs` in .info)."""
    for proc in psutil.process_iter(["pid", *attrs]):
        try:
            if os.getsid(proc.pid) == service.process.pid:
                yield proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            continue


def service_processes(service: ServeProcess):
    """(command line, RSS in MB) of `serve run` and every process in its session, Ray's included."""
    for proc in session_processes(service, ("cmdline", "memory_info")):
        try:
            yield proc.info["cmdline"] or ["?"], proc.info["memory_info"].rss / 1e6
        except (AttributeError, TypeError):  # the process went away while listed
            continue


def replica_name(cmdline: list[str], other: str = "other processes") -> str:
    """The Serve deployment a process is a replica of (its process title), or `other`."""
    title = " ".join(cmdline).split(" ")[0]
    return title.split(":")[-1] if title.startswith("ray::ServeReplica") else other


def replica_rss_mb(service: ServeProcess) -> dict[str, int]:
    """RSS per Serve replica and for everything else the service started, in MB."""
    rss: dict[str, int] = {}
    for cmdline, mb in service_processes(service):
        name = replica_name(cmdline)
        rss[name] = rss.get(name, 0) + round(mb)
    return rss


class ImageServer:
    """Serves in-memory image files over loopback HTTP, as Label Studio serves uploads. `latency_s` delays
    every answer, like a storage bucket in another network would."""

    def __init__(self, files: dict[str, bytes], latency_s: float = 0.0):
        import http.server
        import threading

        self.files = files
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                if latency_s:
                    time.sleep(latency_s)
                data = files.get(self.path.lstrip("/"))
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
