"""grounded-serve: a Label Studio ML backend for Grounding DINO + SAM on Ray Serve."""

import logging

__version__ = "0.1.0"


def get_logger(module: str) -> logging.Logger:
    """The one logger naming scheme: `ray.serve.<module>`. Ray Serve formats and files what its replicas log
    under `ray.serve` (with the request id), and children inherit that; outside Serve they reach the root."""
    return logging.getLogger(f"ray.serve.{module}")
