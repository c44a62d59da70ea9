"""Ray Serve deployment around GroundingDinoDetector: one forward pass per batch of requests."""

from __future__ import annotations

from ray import serve
from ray.serve.metrics import Histogram

from serve_app.deployments.batching import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE, \
    MAX_CONCURRENT_SERVE_BATCHES, BatchConfig, ModelBatcher, apply_batch_config
from serve_app.models.device import set_cpu_threads
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest, Detections

BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


@serve.deployment(name="Detector", max_ongoing_requests=16)
class Detector:
    def __init__(self, model: str, device: str = "auto", precision: str = "fp32"):
        self.model = GroundingDinoDetector.load(model, device, precision)
        self.batcher = ModelBatcher(self.model.detect,
                                    on_batch=lambda results: self.batch_size_histogram.observe(len(results)))
        self.batch_size_histogram = Histogram(
            "grounded_serve_detector_batch_size", description="Items per Grounding DINO forward pass",
            boundaries=BATCH_BOUNDARIES)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.from_user_config(user_config)
        apply_batch_config(self.detect, self.batcher, config)
        set_cpu_threads(config.torch_threads)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S,
                 max_concurrent_batches=MAX_CONCURRENT_SERVE_BATCHES)
    async def detect(self, requests: list[DetectionRequest]) -> list[tuple[Detections, int]]:
        """Returns each caller its detections and the size of the model batch they ran in."""
        return await self.batcher.run(requests)

    def ready(self) -> bool:
        return True
