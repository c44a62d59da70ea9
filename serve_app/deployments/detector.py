"""The detector deployment: text prompts to boxes, batched across requests (serve_app.models.grounding_dino)."""

from __future__ import annotations

from ray import serve

from serve_app.deployments.batching import BatchedModelDeployment, ModelBatcher
from serve_app.models.device import lower_cpu_priority
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest, Detections
from serve_app.telemetry import ModelMetrics


@serve.deployment(name="Detector", max_ongoing_requests=64)  # configs/serve.yaml says why
class Detector(BatchedModelDeployment):
    def __init__(self, model: str, *, device: str = "auto", precision: str = "fp32", cpu_niceness: int = 0,
                 cpu_share: int = 1):
        self.model = GroundingDinoDetector.load(model, device=device, precision=precision)
        self.cpu_share = cpu_share
        if self.model.device.type == "cpu":
            lower_cpu_priority(cpu_niceness)  # the proxy and the ingress answer first (MODEL_CPU_NICENESS)
        self.batcher = ModelBatcher(self.model.detect, on_batch=ModelMetrics().observe_batch,
                                    on_cpu=self.model.device.type == "cpu")

    async def detect(self, request: DetectionRequest) -> Detections:
        return await self.batcher.submit(request)
