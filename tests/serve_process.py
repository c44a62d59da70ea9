"""Runs the real service: `serve run` on a copy of configs/serve.yaml, on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from tests.loopback import stop_session

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "configs" / "serve.yaml"


def model_deployments(config: dict, segmenter: bool = True) -> list[dict]:
    """The Detector's and (with SAM on) the Segmenter's entries of a Serve config. configs/serve.yaml leaves the
    Segmenter out (its defaults are in code); an entry with the Detector's user_config is added to override."""
    deployments = config["applications"][0]["deployments"]
    by_name = {d["name"]: d for d in deployments}
    if segmenter and "Segmenter" not in by_name:
        by_name["Segmenter"] = {"name": "Segmenter", "user_config": dict(by_name["Detector"]["user_config"])}
        deployments.append(by_name["Segmenter"])
    return [by_name[name] for name in ("Detector", "Segmenter") if name in by_name]


def serve_cli() -> list[str]:
    """Ray Serve's CLI beside this Python, or run through it where Ray was installed without its scripts (a
    bundle installed with `pip --target` on a lent GPU machine)."""
    script = Path(sys.executable).parent / "serve"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ray.serve.scripts import cli; sys.exit(cli())"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`serve run` in its own session and Ray cluster; stopped by SIGINT like a person would."""

    def __init__(self, env: dict[str, str], workdir: Path, config_overrides=None, startup_timeout_s: float = 240,
                 address: str = "local", remove_workdir: bool = False):
        self.address = address  # "local": a new single-node cluster; or an existing cluster's GCS address
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.remove_workdir = remove_workdir  # for callers whose workdir is a temp dir of their own, not pytest's
        self.log_path = workdir / "serve.log"
        config = yaml.safe_load(SERVE_CONFIG.read_text())
        config["http_options"]["port"] = self.port
        if config_overrides:
            config_overrides(config)
        self.config_path = workdir / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        # Ray's unix sockets live under RAY_TMPDIR; keep the path short (108-byte socket path limit).
        self.ray_tmp = tempfile.mkdtemp(prefix="gs-ray-", dir="/tmp")
        self.env = {
            **os.environ,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # as the README's command and the Docker image
            "RAY_metrics_report_interval_ms": "1000",  # /metrics (read from Prometheus) lags the work by this
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **env,
            # its own, also when `env` is another ServeProcess's env (a restart): that one's dir is removed already
            "RAY_TMPDIR": self.ray_tmp,
        }
        self.env.pop("RAY_ADDRESS", None)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self, ready=None) -> "ServeProcess":
        """Start and wait until `ready(health_json)` holds (default: every model deployment is serving)."""
        ready = ready or (lambda health: all(health.get("models_ready", {"": False}).values()))
        started = time.monotonic()
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [*serve_cli(), "run", "--address", self.address, str(self.config_path)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = started + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail, code = self.log_tail(), self.process.returncode
                self.stop()  # what Ray left running in the session, and the temp dirs
                raise RuntimeError(f"serve run exited with {code}:\n{tail}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2).json()
                if ready(health):
                    self.startup_s = time.monotonic() - started
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        tail = self.log_tail()  # before stop(), which may remove the log with the workdir
        self.stop()
        raise RuntimeError(f"service not ready after {self.startup_timeout_s} s:\n{tail}")

    def dashboard_url(self) -> str:
        """The Ray dashboard `serve run` started (its REST API is what `serve deploy` talks to), from its log."""
        import re

        found = re.search(r"View the dashboard at \S*?(http://[\w.]+:\d+)", self.log_path.read_text(errors="replace"))
        if not found:
            raise RuntimeError(f"no dashboard address in the log of `serve run`:\n{self.log_tail()}")
        return found.group(1)

    def update_config(self, config_overrides) -> None:
        """`serve deploy` of this service's config with `config_overrides` applied, as an operator updates a
        running application: Serve changes a deployment in place when only its lightweight options
        (user_config, replicas, autoscaling) differ, and restarts its replicas otherwise."""
        config = yaml.safe_load(self.config_path.read_text())
        config_overrides(config)
        self.config_path.write_text(yaml.safe_dump(config))
        subprocess.run([*serve_cli(), "deploy", "--address", self.dashboard_url(),
                        str(self.config_path)], cwd=ROOT, env={**self.env, "RAY_AUTH_MODE": "token"}, check=True,
                       capture_output=True, timeout=120)

    def replica_pids(self, deployment: str) -> list[int]:
        """Process ids of this service's live replicas of `deployment`."""
        import psutil

        pids = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getsid(proc.pid) == self.process.pid and \
                        f"ServeReplica:grounded-serve:{deployment}" in " ".join(proc.info["cmdline"] or []):
                    pids.append(proc.pid)
            except (psutil.NoSuchProcess, OSError):
                continue
        return pids

    def wait_for_log(self, pattern: str, timeout_s: float = 20) -> bool:
        """Replica logs reach `serve run`'s output through Ray's log monitor, a moment after the fact."""
        import re

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if re.search(pattern, self.log_path.read_text(errors="replace")):
                return True
            time.sleep(0.5)
        return False

    def metrics(self, until=lambda metrics: True, timeout_s: float = 30, auth=None) -> dict:
        """GET /metrics until `until(json)` holds: the view is read back from Ray's Prometheus export, a report
        interval (1 s here) after the work."""
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = httpx.get(f"{self.url}/metrics", auth=auth, timeout=30).json()
            if until(snapshot) or time.monotonic() > deadline:
                return snapshot
            time.sleep(0.5)

    def settled_metrics(self, auth=None, timeout_s: float = 30) -> dict:
        """/metrics once every earlier request's numbers have been exported (two reads 2.5 s apart agree)."""
        deadline = time.monotonic() + timeout_s
        previous = self.metrics(auth=auth)
        while True:
            time.sleep(2.5)
            current = self.metrics(auth=auth)
            if current == previous or time.monotonic() > deadline:
                return current
            previous = current

    def prometheus(self, until=lambda families: True, timeout_s: float = 30) -> dict:
        """Metric families on Ray's Prometheus endpoints (from its service-discovery file) once `until` holds."""
        import json

        from prometheus_client.parser import text_string_to_metric_families

        discovery = Path(self.ray_tmp) / "ray" / "prom_metrics_service_discovery.json"
        deadline = time.monotonic() + timeout_s
        while True:
            targets = json.loads(discovery.read_text())[0]["targets"]
            exported = "\n".join(httpx.get(f"http://{target}/metrics", timeout=10).text for target in targets)
            families = {family.name: family for family in text_string_to_metric_families(exported)}
            if until(families) or time.monotonic() > deadline:
                return families
            time.sleep(1)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """As a crash or an OOM kill would: SIGKILL to `serve run` and every Ray process of its session."""
        self.stop(timeout_s=5, first_signal=signal.SIGKILL)

    def stop(self, timeout_s: float = 60, first_signal: int = signal.SIGINT) -> None:
        if self.process is not None:
            # Ray's own processes run in the same session: whatever outlives `serve run` is killed too.
            stop_session(self.process, first_signal, timeout_s)
            self.process = None
        shutil.rmtree(self.ray_tmp, ignore_errors=True)  # also when start() was never called
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
