"""The detector deployment: text prompts to boxes, batched across requests.

DETECTOR_MODEL's family picks the class (serve_app.models.catalog, through serve_app.models.loading). In the
`concept` pipeline it is SAM 3, which returns masks with its boxes and also answers the clicks (`segment`), from the
image features it cached for the prompt; build_app then routes by image, as for the Segmenter. Masks are encoded
here, as the Segmenter encodes its own, not in the ingress.
"""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.deployments.batching import BatchedModelDeployment, ModelBatcher
from serve_app.deployments.replica_cores import lower_cpu_priority
from serve_app.deployments.replica_memory import release_free_memory
from serve_app.graph_plan import ReplicaProcess
from serve_app.masks.encode import encode_masks
from serve_app.models.loading import load
from serve_app.models.messages import DetectionRequest, Detections, Masks, SegmentationRequest
from serve_app.models.spec import ModelSpec
from serve_app.telemetry import CacheReporter, ModelMetrics


@serve.deployment(name="Detector", max_ongoing_requests=64, graceful_shutdown_timeout_s=300)  # serve.yaml: why
class Detector(BatchedModelDeployment):
    def __init__(self, spec: ModelSpec, process: ReplicaProcess = ReplicaProcess()):
        self.model = load(spec)
        self.cpu_share = process.cpu_share
        if self.model.device.type == "cpu":
            lower_cpu_priority(process.cpu_niceness)  # the proxy and the ingress answer first (MODEL_CPU_NICENESS)
        self.model_metrics = ModelMetrics()
        self.report_cache = CacheReporter(self.model) if hasattr(self.model, "cache") else None
        # one queue for prompts and clicks: one model, one worker thread, priorities kept across both
        self.batcher = ModelBatcher(self._run, on_batch=self._after_batch, on_cpu=self.model.device.type == "cpu",
                                    when_idle=release_free_memory,
                                    concurrent_batches=getattr(self.model, "concurrent_batches", False))
        self.loaded()

    async def detect(self, request: DetectionRequest) -> Detections:
        detections = await self.batcher.submit(request)
        if request.boxes_only:
            detections.masks = detections.encoded = None  # not sent back: megabytes per frame the caller would drop
        elif request.encodings and detections.masks is not None:  # beside the next batch, as segment() does
            detections.encoded = await asyncio.to_thread(
                encode_masks, Masks(masks=detections.masks, scores=detections.scores), request.encodings,
                request.polygon_tolerance_px)
            detections.masks = None
        elif request.encodings and detections.encoded is not None:  # run starts found on a GPU: RLE from them
            detections.encoded = await asyncio.to_thread(
                encode_masks, detections.encoded, request.encodings, request.polygon_tolerance_px)
        return detections

    async def segment(self, request: SegmentationRequest) -> Masks:
        """Clicks and drawn boxes (the concept pipeline: SAM 3's tracker on the cached image features)."""
        if not hasattr(self.model, "segment"):
            raise TypeError(f"{type(self.model).__name__} does not segment: the pipeline sent clicks to a detector")
        masks = await self.batcher.submit(request)
        if request.encodings:  # as the Segmenter does: RLE here, beside the next batch, not in the ingress
            masks = await asyncio.to_thread(encode_masks, masks, request.encodings, request.polygon_tolerance_px)
        return masks

    def _run(self, items: list) -> list:
        """Prompts and clicks of one batch, each through its method, results in the items' order."""
        results: list = [None] * len(items)
        prompts = [i for i, item in enumerate(items) if isinstance(item, DetectionRequest)]
        clicks = [i for i, item in enumerate(items) if not isinstance(item, DetectionRequest)]
        for indices, method in ((prompts, "detect"), (clicks, "segment")):
            if indices:
                for i, result in zip(indices, getattr(self.model, method)([items[i] for i in indices])):
                    results[i] = result
        return results

    def _after_batch(self, size: int, waits_s: list[float]) -> None:
        self.model_metrics.observe_batch(size, waits_s)
        if self.report_cache is not None:
            self.report_cache()
