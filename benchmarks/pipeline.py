"""The service's per-task work in one process, without Ray: the reference the benchmarks compare against.

`InProcessPipeline.predict(body)` parses the label config and prompt, fetches and decodes each image,
runs the same GroundingDinoDetector and SamSegmenter code, and builds Label Studio results with the same
ingress helpers, one task after another. It records how long each stage took, so a benchmark can say
where a request's time goes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from contextlib import contextmanager
from typing import Any

from serve_app.ingress.app import resolve_thresholds
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from serve_app.ingress.label_config import parse_label_config
from serve_app.ingress.prompts import parse_prompt, prompt_from_labels, prompt_text_from_context
from serve_app.ingress.results import build_prediction
from serve_app.models.grounding_dino import GroundingDinoDetector
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.models.segmenter import SamSegmenter
from serve_app.settings import Settings


class InProcessPipeline:
    def __init__(self, detector: GroundingDinoDetector, segmenter: SamSegmenter | None, settings: Settings,
                 image_hosts: frozenset[str] = frozenset({"127.0.0.1"})):
        self.detector = detector
        self.segmenter = segmenter
        self.settings = settings
        self.policy = ImageSourcePolicy(
            max_bytes=settings.max_download_bytes, timeout_s=settings.download_timeout_s,
            max_pixels=settings.max_image_pixels, label_studio_url="", trust_label_studio_host=False,
            document_root="", host_allowlist=image_hosts)
        self.stage_s: dict[str, list[float]] = collections.defaultdict(list)
        self.loop = asyncio.new_event_loop()  # one loop and one HTTP client for all requests, as a server keeps
        self.fetcher = ImageFetcher(self.policy)

    def close(self) -> None:
        self.loop.run_until_complete(self.fetcher.aclose())
        self.loop.close()

    @classmethod
    def load(cls, settings: Settings) -> "InProcessPipeline":
        detector = GroundingDinoDetector.load(settings.grounding_dino_model, settings.device, settings.precision)
        segmenter = None
        if settings.sam_enabled:
            segmenter = SamSegmenter.load(settings.segmenter_checkpoint, settings.segmenter_model_type,
                                          settings.device, settings.precision,
                                          cache_bytes=settings.sam_embedding_cache_bytes)
        return cls(detector, segmenter, settings)

    @contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_s[name].append(time.perf_counter() - started)

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.loop.run_until_complete(self._predict(body))

    async def _predict(self, body: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        with self.stage("parse"):
            config = parse_label_config(body["label_config"])
            context = (body.get("params") or {}).get("context")
            text = prompt_text_from_context(context, config)
            prompt = (prompt_from_labels(config, s.max_phrases) if text is None
                      else parse_prompt(text, config, s.max_prompt_chars, s.max_phrases))
            thresholds = resolve_thresholds(s, config, context)
        results = [await self._task(self.fetcher, task, config, prompt, thresholds) for task in body["tasks"]]
        return {"results": results, "model_version": "in-process"}

    async def _task(self, fetcher: ImageFetcher, task, config, prompt, thresholds) -> dict[str, Any]:
        with self.stage("fetch"):
            data = await fetcher.fetch(fetcher.resolve(task["data"][config.image_key], task.get("id")))
        with self.stage("decode"):
            image = decode_image(data, self.settings.max_image_pixels)
            image_key = hashlib.blake2b(data, digest_size=16).hexdigest()
        with self.stage("detect"):
            [detections] = self.detector.detect([DetectionRequest(
                image=image.pixels, phrases=[p.text for p in prompt.phrases],
                box_threshold=thresholds["box_threshold"], text_threshold=thresholds["text_threshold"],
                max_detections=self.settings.max_detections)])
        masks = None
        if self.segmenter is not None and config.mask_outputs and len(detections):
            with self.stage("segment"):
                [segmented] = self.segmenter.segment([SegmentationRequest(
                    image=image.pixels, boxes=detections.boxes, image_key=image_key)])
                masks = segmented.masks
        with self.stage("results"):
            return build_prediction(config, prompt.phrases, detections.boxes, detections.scores,
                                    detections.phrase_ids, masks, image.width, image.height, "in-process",
                                    self.settings.polygon_tolerance_px)
