"""The service's labelling pipeline in one process, without Ray: the reference the benchmarks compare against.

`InProcessPipeline.predict(body)` runs serve_app.ingress.pipeline.LabellingPipeline, the very class the
ingress runs, with the model classes called directly instead of through deployment handles, one task
after another (TASK_CONCURRENCY=1), and records how long each stage took.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any

from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings


def load_models(settings: Settings) -> tuple[GroundingDinoDetector, SamSegmenter | None]:
    """The detector and (if enabled) segmenter the settings name, loaded as the deployments load them."""
    detector = GroundingDinoDetector.load(settings.detector_model, device=settings.device,
                                          precision=settings.precision)
    segmenter = None
    if settings.sam_enabled:
        segmenter = SamSegmenter.load(settings.segmenter_checkpoint, model_type=settings.segmenter_model_type,
                                      device=settings.device, precision=settings.precision,
                                      cache_bytes=settings.sam_embedding_cache_bytes)
    return detector, segmenter


class InProcessPipeline:
    def __init__(self, detector: GroundingDinoDetector, segmenter: SamSegmenter | None, settings: Settings,
                 image_hosts: frozenset[str] = frozenset({"127.0.0.1"})):
        self.stage_s: dict[str, list[float]] = collections.defaultdict(list)
        self.loop = asyncio.new_event_loop()  # one loop and one HTTP client for all requests, as a server keeps
        policy = ImageSourcePolicy(max_bytes=settings.max_download_bytes, timeout_s=settings.download_timeout_s,
                                   max_pixels=settings.max_image_pixels, host_allowlist=image_hosts)
        self.fetcher = ImageFetcher(policy)
        self.pipeline = LabellingPipeline(
            settings=dataclasses.replace(settings, task_concurrency=1), model_version="in-process",
            detect=in_thread(detector.detect), segment=in_thread(segmenter.segment) if segmenter else None,
            fetcher=self.fetcher, observe_stage=lambda stage, seconds: self.stage_s[stage].append(seconds))

    @classmethod
    def load(cls, settings: Settings) -> "InProcessPipeline":
        return cls(*load_models(settings), settings)

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.loop.run_until_complete(self.pipeline.predict(body))

    def close(self) -> None:
        self.loop.run_until_complete(self.fetcher.aclose())
        self.loop.close()
