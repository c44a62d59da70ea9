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
