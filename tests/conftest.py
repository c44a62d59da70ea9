"""Shared fixtures: tiny models saved and reloaded through the production code, real image files,
and a loopback HTTP server that serves them."""

from __future__ import annotations

import functools
import http.server
import json
import os
from pathlib import Path

import pytest

from tests.imaging import write_test_images

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LS_FIXTURES = SHARED / "fixtures" / "label-studio"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def load_ls_fixture(name: str) -> dict:
    return json.loads((LS_FIXTURES / name).read_text())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    from serve_app.tiny_models.grounding_dino_sam import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("images")
    write_test_images(directory)
    return directory


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output readable
        pass


@pytest.fixture(scope="session")
def image_server(image_dir) -> str:
    """Serves `image_dir` on 127.0.0.1; yields the base URL."""
    from tests.loopback import loopback_http

    with loopback_http(functools.partial(_QuietHandler, directory=str(image_dir))) as url:
        yield url


@pytest.fixture(scope="module")
def label_studio(request, tmp_path_factory):
    """A real Label Studio on 127.0.0.1 (see tests/label_studio.py), one per test module; a module's
    LABEL_STUDIO_ENV (for example a low ML_TIMEOUT_PREDICT) is added to its environment."""
    from tests.label_studio import LabelStudio, label_studio_binary

    if label_studio_binary() is None:
        message = "Label Studio is not installed: run scripts/install-label-studio"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it; a missing install must not pass as a skip
        pytest.skip(message)
    server = LabelStudio(tmp_path_factory.mktemp("label-studio"),
                         extra_env=getattr(request.module, "LABEL_STUDIO_ENV", {})).start()
    yield server
    server.stop()
