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

from serve_app.graph_plan import plan_graph
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.pipeline import LabellingPipeline, in_thread
from serve_app.models.loading import load
from serve_app.settings import Settings


def load_models(settings: Settings) -> tuple[Any, Any | None]:
    """The detector and (if the plan has one) segmenter the settings name, loaded as the deployments load them:
    from the graph plan's model specs, through serve_app.models.loading.load."""
    plan = plan_graph(settings)
    return load(plan.detector), load(plan.segmenter) if plan.segmenter is not None else None


class InProcessPipeline:
    def __init__(self, detector: Any, segmenter: Any | None, settings: Settings,
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
