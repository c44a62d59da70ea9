"""The architecture grounded-serve replaces, for comparison: one process, models in it, tasks one by one.

    python -m benchmarks.seed_backend --port 9191     (models from the same environment variables)

This is how Label Studio's `grounding_sam` example serves: a single-process web server whose
predict() loops over the tasks, fetching each image and running Grounding DINO then SAM before the
next. SAM runs as the example runs it: segment-anything's `SamPredictor` (`set_image`, then every box in one
`predict_torch` call with SAM's own full-size post-processing). Grounding DINO, fetching, decoding and the
result code are grounded-serve's own (benchmarks.pipeline), with torch's default threads (all cores) and the
same orjson encoding. Loopback only.
"""

from __future__ import annotations

import argparse
import http.server
import json

import numpy as np
import orjson
import torch

from benchmarks.pipeline import InProcessPipeline, load_models
from serve_app.models.device import autocast_for
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings


class SamPredictorSegmenter:
    """SAM called the way the grounding_sam example calls it, on the same loaded model."""

    def __init__(self, segmenter: SamSegmenter):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(segmenter.sam)
        self.device, self.precision = segmenter.device, segmenter.precision

    @torch.inference_mode()
    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        return [self._one(request) for request in requests]

    def _one(self, request: SegmentationRequest) -> Masks:
        size = request.image.shape[:2]
        if not len(request.boxes):
            return Masks(masks=np.zeros((0, *size), bool))
        with autocast_for(self.device, self.precision):
            self.predictor.set_image(request.image)
        self.predictor.features = self.predictor.features.float()  # the decoder runs fp32, as in SamSegmenter
        boxes = torch.as_tensor(np.asarray(request.boxes, np.float32), device=self.device)
        masks, scores, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None, boxes=self.predictor.transform.apply_boxes_torch(boxes, size),
            multimask_output=False)
        return Masks(masks=masks[:, 0].cpu().numpy(), scores=scores[:, 0].float().cpu().numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings.load()
    detector, segmenter = load_models(settings)
    pipeline = InProcessPipeline(detector, SamPredictorSegmenter(segmenter) if segmenter else None, settings)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, payload: dict) -> None:
            data = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._send(200, {"status": "UP"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(200, pipeline.predict(body))

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", args.port), Handler)  # one request at a time, like the seed
    print(f"seed backend on http://127.0.0.1:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        pipeline.close()


if __name__ == "__main__":
    main()
