"""The architecture grounded-serve replaces, for comparison: one process, models in it, tasks one by one.

    python -m benchmarks.seed_backend --port 9191     (models from the same environment variables)

This is how Label Studio's `grounding_sam` example serves: a single-process web server whose
predict() loops over the tasks, fetching each image and running Grounding DINO then SAM before the
next. It uses grounded-serve's own model and result code (benchmarks.pipeline), torch's default
threads (all cores), and the same orjson encoding, so only the architecture differs. Loopback only.
"""

from __future__ import annotations

import argparse
import http.server
import json

import orjson

from benchmarks.pipeline import InProcessPipeline
from serve_app.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    pipeline = InProcessPipeline.load(Settings.load())

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
