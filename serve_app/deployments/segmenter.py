"""Ray Serve deployment around SamSegmenter: one image-encoder pass per batch of images."""

from __future__ import annotations

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.deployments.batching import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE, \
    MAX_CONCURRENT_SERVE_BATCHES, BatchConfig, ModelBatcher, apply_batch_config
from serve_app.deployments.detector import BATCH_BOUNDARIES
from serve_app.models.device import set_cpu_threads
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.segmenter import SamSegmenter


@serve.deployment(name="Segmenter", max_ongoing_requests=16)
class Segmenter:
    def __init__(self, checkpoint: str, model_type: str = "auto", device: str = "auto", precision: str = "fp32",
                 setting: str = "SAM_CHECKPOINT", sha256: str = "", cache_dir: str = "", cache_bytes: int = 0):
        self.model = SamSegmenter.load(checkpoint, model_type, device, precision, setting, sha256, cache_dir,
                                       cache_bytes)
        self.batcher = ModelBatcher(self._run_model, on_batch=self._observe_batch)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.cache_lookups = Counter("grounded_serve_sam_embedding_cache_lookups",
                                     description="SAM embedding cache lookups", tag_keys=("result",))
        self.cache_bytes = Gauge("grounded_serve_sam_embedding_cache_bytes", description="Bytes of cached embeddings")
        self.batch_size_histogram = Histogram(
            "grounded_serve_segmenter_batch_size", description="Images per SAM image-encoder pass",
            boundaries=BATCH_BOUNDARIES)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.from_user_config(user_config)
        apply_batch_config(self.segment, self.batcher, config)
        self.model.encoder_batch_size = config.max_batch_size
        set_cpu_threads(config.torch_threads)

    def _run_model(self, requests: list[SegmentationRequest]) -> list[tuple[Masks, dict]]:
        results = self.model.segment(requests)
        stats = {**self.model.cache.stats(), "images_encoded": self.model.images_encoded,
                 "replica": self.replica_id}
        return [(result, stats) for result in results]

    def _observe_batch(self, results: list[tuple[Masks, dict]]) -> None:
        self.batch_size_histogram.observe(len(results))
        self.cache_bytes.set(results[0][1]["bytes"])
        for masks, _ in results:
            self.cache_lookups.inc(tags={"result": "hit" if masks.cache_hit else "miss"})

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S,
                 max_concurrent_batches=MAX_CONCURRENT_SERVE_BATCHES)
    async def segment(self, requests: list[SegmentationRequest]) -> list[tuple[Masks, int, dict]]:
        """Each caller gets its masks, the model batch size it ran in, and this replica's cache statistics."""
        return [(masks, batch_size, stats) for (masks, stats), batch_size in await self.batcher.run(requests)]

    def ready(self) -> bool:
        return True
