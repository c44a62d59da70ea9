"""Small helpers for tests: HTTP servers on 127.0.0.1, stopping process groups, SAM reference masks."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import threading

import numpy as np


@contextlib.contextmanager
def loopback_http(handler):
    """Serve `handler` (a BaseHTTPRequestHandler class or factory) on 127.0.0.1; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def stop_session(process: subprocess.Popen, first_signal: int, timeout_s: float) -> None:
    """Ask a process started with start_new_session=True to stop, then kill what is left of its session."""
    if process.poll() is None:
        process.send_signal(first_signal)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass


def assert_matches_sam_predictor(sam, images, boxes, results) -> None:
    """Each result equals SamPredictor run on its image alone: bit-equal masks, IoU scores within 1e-5."""
    import torch
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    for image, box, result in zip(images, boxes, results):
        predictor.set_image(image)
        masks, scores, _ = predictor.predict_torch(
            point_coords=None, point_labels=None,
            boxes=predictor.transform.apply_boxes_torch(torch.as_tensor(box), image.shape[:2]),
            multimask_output=False)
        assert result.masks.shape == (len(box), *image.shape[:2]) and result.masks.dtype == bool
        assert np.array_equal(result.masks, masks[:, 0].numpy())
        np.testing.assert_allclose(result.scores, scores[:, 0].numpy(), atol=1e-5)


class PredictionsStandIn:
    """Label Studio's `/api/predictions/` as far as background jobs use it, for tests that need no real Label
    Studio (tests/test_label_studio_e2e.py and test_background_jobs_e2e.py use the real one). Stores what is
    POSTed (with an id, which DELETE takes); `fail_after_storing` answers that many POSTs 502 *after* storing them (a
    proxy that lost the reply)."""

    def __init__(self, token: str = "stand-in-token", fail_after_storing: int = 0):
        import json
        import urllib.parse

        self.token = token
        self.rows: list[dict] = []
        self.next_id = 0
        self.posts = 0
        self.imports = 0  # bulk imports (POST /api/projects/{id}/import/predictions)
        self.fail_after_storing = fail_after_storing
        self.lock = threading.Lock()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != f"Token {stand_in.token}":
                    self._answer(401, {"detail": "Authentication credentials were not provided."})
                    return False
                return True

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if not self._authorized():
                    return
                if self.path.startswith("/api/projects/") and self.path.endswith("/import/predictions"):
                    with stand_in.lock:
                        stand_in.imports += 1
                        for item in body:
                            stand_in.next_id += 1
                            stand_in.rows.append({"id": stand_in.next_id, **item})
                    return self._answer(201, {"created": len(body)})
                if self.path.rstrip("/") != "/api/predictions":
                    return self._answer(404, {})
                with stand_in.lock:
                    stand_in.posts += 1
                    stand_in.next_id += 1
                    row = {"id": stand_in.next_id, **body}
                    stand_in.rows.append(row)
                    fail = stand_in.fail_after_storing > 0
                    stand_in.fail_after_storing -= fail
                self._answer(502 if fail else 201, row)

            def do_DELETE(self):
                if not self._authorized():
                    return
                row_id = self.path.strip("/").rsplit("/", 1)[-1]
                with stand_in.lock:
                    before = len(stand_in.rows)
                    stand_in.rows = [row for row in stand_in.rows if str(row["id"]) != row_id]
                    found = len(stand_in.rows) < before
                self._answer(204 if found else 404, {})

            def do_GET(self):
                if not self._authorized():
                    return
                parts = urllib.parse.urlsplit(self.path)
                task = urllib.parse.parse_qs(parts.query).get("task", [""])[0]
                with stand_in.lock:
                    rows = [row for row in stand_in.rows if str(row.get("task")) == task]
                self._answer(200, rows)

        self.handler = Handler

    def for_task(self, task_id: int) -> list[dict]:
        with self.lock:
            return [row for row in self.rows if row.get("task") == task_id]


@contextlib.contextmanager
def predictions_api(token: str = "stand-in-token"):
    """A PredictionsStandIn served on 127.0.0.1; yields it, with its `url` set."""
    store = PredictionsStandIn(token=token)
    with loopback_http(store.handler) as url:
        store.url = url
        yield store


def image_handler(image: bytes, delay_s: float = 0.0, slow_prefix: str = "", fetched=None):
    """A handler that answers every GET with `image` (PNG), after `delay_s` for paths under `slow_prefix`
    (every path when it is empty): slow storage, without slowing the models. `fetched` (a Counter) counts the
    downloads of each path."""
    import time

    lock = threading.Lock()

    class ImageHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            if fetched is not None:
                with lock:
                    fetched[self.path] += 1
            if delay_s and self.path.startswith(slow_prefix):
                time.sleep(delay_s)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *args):
            pass

    return ImageHandler
