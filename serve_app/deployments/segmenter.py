"""The segmenter deployment: boxes and clicks to masks, batched across requests (the catalog's segmenter families:
serve_app.models.segmenter for segment-anything checkpoints, serve_app.models.hf_segmenter for transformers').

Requests for one image reach the replica caching its embedding through serve_app.deployments.routing.
Its defaults are set here, not in configs/serve.yaml: the app has no Segmenter when SAM is off, and Serve
refuses a config that names a deployment the app lacks. A `Segmenter` entry in the config overrides them.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app.deployments.batching import BatchedModelDeployment, ModelBatcher
from serve_app.deployments.routing import ImageAffinityRouter
from serve_app.deployments.replica_cores import lower_cpu_priority
from serve_app.deployments.replica_memory import release_free_memory
from serve_app.graph_plan import ReplicaProcess
from serve_app.masks.encode import encode_masks
from serve_app.models.loading import load
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.spec import ModelSpec
from serve_app.telemetry import CacheReporter, ModelMetrics


@serve.deployment(
    name="Segmenter",
    max_ongoing_requests=64,  # as the Detector's in configs/serve.yaml: the replica orders work by priority
    max_queued_requests=2048,  # items waiting in each caller; beyond it /predict answers 503 + Retry-After
    graceful_shutdown_timeout_s=300,  # a replica autoscaling removes finishes the work it holds (configs/serve.yaml)
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8, "upscale_delay_s": 10,
                        "downscale_delay_s": 120},
    request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter),
    user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.0, "torch_threads": 0, "cpu_batch_s": 1.0,
                 "background_batch_s": 0.25},
)
class Segmenter(BatchedModelDeployment):
    def __init__(self, spec: ModelSpec, process: ReplicaProcess = ReplicaProcess()):
        self.model = load(spec)  # a segment-anything .pth (SAM, MobileSAM) or a transformers SAM family
        self.cpu_share = process.cpu_share
        if self.model.device.type == "cpu":
            lower_cpu_priority(process.cpu_niceness)  # the proxy and the ingress answer first (MODEL_CPU_NICENESS)
        self.model_metrics = ModelMetrics()
        self.report_cache = CacheReporter(self.model)
        self.batcher = ModelBatcher(self.model.segment, on_batch=self._after_batch,
                                    on_cpu=self.model.device.type == "cpu", when_idle=release_free_memory)
        self.loaded()

    async def segment(self, request: SegmentationRequest) -> Masks:
        masks = await self.batcher.submit(request)
        if request.encodings:  # beside the next batch, not in the model's thread: RLE here, not in the ingress
            masks = await asyncio.to_thread(encode_masks, masks, request.encodings, request.polygon_tolerance_px)
        return masks

    def _after_batch(self, size: int, waits_s: list[float]) -> None:
        self.model_metrics.observe_batch(size, waits_s)
        self.report_cache()
