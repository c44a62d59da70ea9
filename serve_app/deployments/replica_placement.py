"""One log line per model replica saying where Ray put it: its node, the GPU ids it was given, its torch device.

Operators read it to see how replicas share GPUs (docs/gpu-placement.md); the placement test reads it to check
the prediction against what Ray really did (logical GPUs get ids too)."""

from __future__ import annotations

from serve_app import get_logger

logger = get_logger(__name__)


def log_placement(deployment: str, device: object) -> None:
    import ray

    if not ray.is_initialized():  # constructed outside Ray (fast tests, benchmarks)
        return
    context = ray.get_runtime_context()
    gpu_ids = context.get_accelerator_ids().get("GPU", [])
    logger.info("placed %s replica: node %s, GPU ids [%s], model on %s", deployment, context.get_node_id()[:12],
                ",".join(gpu_ids), device)
