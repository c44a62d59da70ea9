"""A real Label Studio for end-to-end tests: its own virtual environment, sqlite, 127.0.0.1 only.

Label Studio hard-pins many packages, so it lives in `.venv-ls` (LABEL_STUDIO_VENV), which
`scripts/install-label-studio` creates. Django migrations take 25-55 s on these machines, so a
migrated data directory is built once (`.cache/label-studio-template`) and copied for each start
(about 4 s).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.loopback import stop_session
from tests.serve_process import ROOT, free_port

LS_VENV = Path(os.environ.get("LABEL_STUDIO_VENV", ROOT / ".venv-ls"))
TEMPLATE = ROOT / ".cache" / "label-studio-template"
USERNAME = "e2e@example.com"
PASSWORD = "e2e-password-123"
LEGACY_TOKEN = "e2e-legacy-token-0123456789"
# Label Studio rejects a stored prediction whose labels or regions do not fit the config.
VALIDATE_PREDICTIONS_FLAG = "fflag_feat_utc_210_prediction_validation_15082025"


def label_studio_binary() -> Path | None:
    binary = LS_VENV / "bin" / "label-studio"
    return binary if binary.exists() else None


def _env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "VIRTUAL_ENV"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": LEGACY_TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
        # an ML backend and its webhook on 127.0.0.1 need both
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        VALIDATE_PREDICTIONS_FLAG: "true",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
        "PATH": f"{LS_VENV / 'bin'}:{os.environ.get('PATH', '')}",
    })
    return env


def ensure_template(binary: Path) -> Path:
    """A migrated, user-less data directory, built once and reused."""
    if (TEMPLATE / "label_studio.sqlite3").exists():
        return TEMPLATE
    building = TEMPLATE.with_name(TEMPLATE.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    env = _env(building, 0)
    for key in ("LABEL_STUDIO_USERNAME", "LABEL_STUDIO_PASSWORD", "LABEL_STUDIO_USER_TOKEN"):
        env.pop(key)
    subprocess.run([str(binary), "init", "-q", "--data-dir", str(building)], env=env, check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    shutil.rmtree(TEMPLATE, ignore_errors=True)
    building.rename(TEMPLATE)
    return TEMPLATE


class LabelStudio:
    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None):
        binary = label_studio_binary()
        if binary is None:
            raise RuntimeError(f"Label Studio is not installed in {LS_VENV}; run scripts/install-label-studio")
        self.binary = binary
        self.data_dir = workdir / "label-studio-data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "label-studio.log"
        self.process: subprocess.Popen | None = None
        self._personal_access_token = ""
        self.extra_env = dict(extra_env or {})

    def start(self, timeout_s: float = 240) -> "LabelStudio":
        shutil.copytree(ensure_template(self.binary), self.data_dir)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(self.binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            env={**_env(self.data_dir, self.port), **self.extra_env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Label Studio exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Label Studio did not start in {timeout_s} s: {self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def personal_access_token(self) -> str:
        """The admin's personal access token (a JWT refresh token), created once by logging in as a browser."""
        if self._personal_access_token:
            return self._personal_access_token
        with httpx.Client(base_url=self.url, timeout=30) as session:
            session.get("/user/login/")
            csrf = session.cookies.get("csrftoken")
            response = session.post("/user/login/", data={"email": USERNAME, "password": PASSWORD,
                                                          "csrfmiddlewaretoken": csrf},
                                    headers={"Referer": f"{self.url}/user/login/"})
            assert response.status_code in (200, 302), response.text[:300]
            headers = {"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": f"{self.url}/"}
            response = session.post("/api/token/", headers=headers)
            response.raise_for_status()
            self._personal_access_token = response.json()["token"]
            return self._personal_access_token

    def stop(self) -> None:
        if self.process is None:
            return
        stop_session(self.process, signal.SIGTERM, 20)
        self.process = None
