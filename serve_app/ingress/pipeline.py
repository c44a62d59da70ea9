"""The labelling pipeline: a Label Studio `/predict` body in, one prediction per task out. No Ray, no HTTP.

Per request, `parse` reads the label config, the context (prompt, thresholds, drawn regions) and the prompt
once into a `LabellingRequest`. Per task, `label_task` resolves and fetches the image, decodes it, detects,
segments and builds Label Studio results. The model steps are async callables the caller provides: handle
calls into the model deployments in the service (serve_app.ingress.app), the model classes themselves in the
benchmarks and fast tests, so "what the graph adds" is measured against this very code.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from serve_app import get_logger
from serve_app.ingress.context import DrawnRegions, Exemplar, VideoBox, parse_context
from serve_app.ingress.errors import BadRequest, ServiceUnavailable
from serve_app.ingress.exemplars import NOT_SUPPORTED, exemplar_arrays, exemplar_prompt
from serve_app.ingress.images import ImageFetcher, LoadedImage, decode_image, image_size
from serve_app.ingress.interactive import Clicks, click_label
from serve_app.ingress.label_config import ProjectConfig, parse_label_config
from serve_app.ingress.memory import ByteBudget, task_bytes
from serve_app.ingress.prompts import Prompt, parse_prompt, prompt_from_labels
from serve_app.ingress.results import build_click_prediction, build_prediction, mask_encodings
from serve_app.ingress.video_tasks import label_video
from serve_app.models.messages import DetectionRequest, Detections, Masks, Priority, SegmentationRequest
from serve_app.settings import Settings

logger = get_logger(__name__)

Detect = Callable[[DetectionRequest], Awaitable[Detections]]
Segment = Callable[[SegmentationRequest], Awaitable[Masks]]
RunBlocking = Callable[..., Awaitable[Any]]  # run_blocking(function, *args): off the event loop
ObserveStage = Callable[[str, float], None]


@dataclass(frozen=True)
class Thresholds:
    box: float
    text: float
    exemplar: float = 0.30  # for what exemplar boxes find (EXEMPLAR_THRESHOLD)


@dataclass(frozen=True)
class LabellingRequest:
    """Everything a request's tasks share, parsed once."""

    tasks: list[Any]
    config: ProjectConfig
    prompt: Prompt
    thresholds: Thresholds
    regions: DrawnRegions
    interactive: bool = False  # sent from the editor (a context): Label Studio shows the answer, stores nothing
    project: str = ""  # as Label Studio names it: "<project id>.<created timestamp>"
    fetcher: Any = None  # the ImageFetcher of the Label Studio instance that sent it; None: the pipeline's own
    exemplars: tuple[Exemplar, ...] = ()  # boxes drawn with the exemplar control (serve_app.ingress.exemplars)
    exemplar_phrases: tuple[int, ...] = ()  # the phrase each exemplar serves
    video_box: VideoBox | None = None  # a box drawn on a video frame, to track (the editor, Auto-Annotation on)


# The priority of the task this code runs for (an asyncio task copies it when created): the model requests
# carry it to the replicas' queues, and the ingress's CPU pool reads it. Background jobs set it for their tasks.
TASK_PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("task_priority", default=Priority.INTERACTIVE)


def task_priority() -> int:
    return TASK_PRIORITY.get()


# What a failed task gets in `results`. Label Studio 1.23 stores nothing for an empty list (ml/models.py,
# _get_predictions_from_ml_backend), so the task stays retryable; `{"result": []}` would be stored as a
# prediction of this model version and skipped by every later "Retrieve predictions".
NO_PREDICTION: list = []


@dataclass(frozen=True)
class TaskOutcome:
    prediction: dict[str, Any] | list
    error: str | None = None  # why the task failed; its prediction is then NO_PREDICTION
    unavailable: bool = False  # it failed because the models could not take it (a 503 if no task succeeded)


def in_thread(batch_fn: Callable[[list], list]) -> Callable[[Any], Awaitable[Any]]:
    """A model's batch method as a one-item async callable (in-process use: benchmarks, fast tests)."""
    async def call(item: Any) -> Any:
        return (await asyncio.to_thread(batch_fn, [item]))[0]

    return call


async def _to_thread(function, *args):
    return await asyncio.to_thread(function, *args)


class LabellingPipeline:
    def __init__(self, *, settings: Settings, model_version: str, detect: Detect, segment: Segment | None,
                 fetcher: ImageFetcher, run_blocking: RunBlocking = _to_thread,
                 observe_stage: ObserveStage | None = None, memory: ByteBudget | None = None,
                 exemplars: bool = False, detector_name: str = "", track: Callable[[Any], Awaitable[Any]] | None = None,
                 track_detects: bool = False):
        self.settings = settings
        self.exemplars = exemplars  # the detector takes exemplar boxes (the graph plan, from the catalog)
        self.detector_name = detector_name or f"DETECTOR_MODEL={settings.detector_model!r}"
        self.model_version = model_version
        self.detect = detect
        self.segment = segment
        self.track = track  # the Tracker's step (detect+track on videos); None: ByteTrack links the boxes
        self.track_detects = track_detects  # the Tracker finds the phrases itself (SAM 3): frames skip the Detector
        self.fetcher = fetcher  # for requests that carry none of their own (LabellingRequest.fetcher)
        self.run_blocking = run_blocking
        self.observe_stage = observe_stage
        self.memory = memory or ByteBudget(settings.ingress_image_memory_bytes)  # decoded images and masks
        self.video_slots = asyncio.Semaphore(settings.video_task_concurrency)  # videos on disk and decoding at once

    # -- per request ----------------------------------------------------------------------------

    def parse(self, body: Any) -> LabellingRequest:
        s = self.settings
        if not isinstance(body, dict):
            raise BadRequest("the /predict body must be a JSON object")
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequest("'tasks' must be a list of Label Studio tasks")
        if not tasks:
            raise BadRequest("'tasks' is empty")
        if len(tasks) > s.max_tasks_per_request:
            raise BadRequest(f"{len(tasks)} tasks in one request; the limit is {s.max_tasks_per_request} "
                             "(MAX_TASKS_PER_REQUEST)", status_code=413)
        config = parse_label_config(body.get("label_config"), s.exemplar_control)
        params = body.get("params")
        raw_context = params.get("context") if isinstance(params, dict) else None
        context = parse_context(raw_context, config, s.max_context_items, s.max_exemplars)
        typed = None if context.prompt_text is None else \
            parse_prompt(context.prompt_text, config, s.max_prompt_chars, s.max_phrases)
        exemplar_phrases: tuple[int, ...] = ()
        if context.exemplars:
            if not self.exemplars:
                raise BadRequest(NOT_SUPPORTED.format(detector=self.detector_name))
            prompt, exemplar_phrases = exemplar_prompt(context.exemplars, typed, config, s.max_phrases)
        else:
            prompt = typed if typed is not None else prompt_from_labels(config, s.max_phrases)
        # environment defaults < the config's Number tags' defaultValue < numbers sent in the context
        thresholds = {"box_threshold": s.box_threshold, "text_threshold": s.text_threshold,
                      "exemplar_threshold": s.exemplar_threshold,
                      **config.thresholds, **context.thresholds}
        return LabellingRequest(tasks=tasks, config=config, prompt=prompt,
                                thresholds=Thresholds(thresholds["box_threshold"], thresholds["text_threshold"],
                                                      thresholds["exemplar_threshold"]),
                                regions=DrawnRegions() if context.exemplars else context.regions,
                                interactive=raw_context is not None, project=project_name(body.get("project")),
                                exemplars=context.exemplars, exemplar_phrases=exemplar_phrases,
                                video_box=context.video_box if config.video else None)

    async def predict(self, body: Any) -> dict[str, Any]:
        """The `/predict` answer: one prediction per task, in order. Raises BadRequest for the request as a
        whole and ServiceUnavailable when the models cannot take it; a failing task only fails itself."""
        return await self.answer(await self.parse_off_loop(body))

    async def parse_off_loop(self, body: Any) -> LabellingRequest:
        request = await self.run_blocking(self.parse, body)  # label config and context: CPU work, off the loop
        for warning in request.prompt.warnings:
            logger.info("prompt: %s", warning)
        return request

    async def answer(self, request: LabellingRequest) -> dict[str, Any]:
        """Every task's prediction, however long it takes (the editor's requests, in-process callers)."""
        return response_for(request, await self.label_tasks(request), self.model_version)

    async def label_tasks(self, request: LabellingRequest) -> list[TaskOutcome]:
        """Every task, at most TASK_CONCURRENCY at once. A ServiceUnavailable cancels the others and propagates."""
        limit = asyncio.Semaphore(self.settings.task_concurrency)

        async def bounded(task: Any) -> TaskOutcome:
            async with limit:
                return await self.label_task_outcome(request, task)

        try:
            async with asyncio.TaskGroup() as group:
                running = [group.create_task(bounded(task)) for task in request.tasks]
        except* ServiceUnavailable as failures:
            raise failures.exceptions[0] from None
        return [task.result() for task in running]

    # -- per task -------------------------------------------------------------------------------

    async def label_task_outcome(self, request: LabellingRequest, task: Any) -> TaskOutcome:
        """The task's prediction, or NO_PREDICTION and why. Only ServiceUnavailable escapes."""
        task_id = echoable_id(_task_id(task))  # logs, like answers, never carry a 5,000-digit id or a surrogate
        # a video from Retrieve may run for an hour in its job; the editor's own request waits only as Label Studio does
        long_video = bool(request.config.video) and not request.interactive
        timeout_s = self.settings.video_task_timeout_s if long_video else self.settings.task_timeout_s
        try:
            return TaskOutcome(await asyncio.wait_for(self.label_task(request, task), timeout=timeout_s))
        except BadRequest as exc:
            error = str(exc)
            logger.warning("task %s: %s", task_id, exc)
        except ServiceUnavailable:
            raise
        except asyncio.TimeoutError:
            error = f"no result within {timeout_s:g} s ({'VIDEO_TASK_TIMEOUT_S' if long_video else 'TASK_TIMEOUT_S'})"
            if request.config.video and not long_video:
                error += ("; from the editor a video must finish within it: \"Retrieve predictions\" labels a long "
                          "video in the background")
            logger.error("task %s: %s", task_id, error)
        except Exception as exc:  # noqa: BLE001 - one broken task must not lose the others
            error = f"internal error: {exc.__class__.__name__}"
            logger.exception("task %s failed", task_id)
        return TaskOutcome(list(NO_PREDICTION), error)

    async def label_task(self, request: LabellingRequest, task: Any) -> dict[str, Any]:
        """One task's prediction: image -> detections -> masks -> Label Studio results (or a video's tracks)."""
        config, s = request.config, self.settings
        if config.video:
            return await label_video(self, request, task, task_url(config, task))
        data = await self._fetch(config, task, request.fetcher)
        width, height = await self.run_blocking(image_size, data, s.max_image_pixels)
        masks_at_most = 1 if request.regions else (s.max_detections if self._masks_wanted(config) else 0)
        async with self.memory.hold(task_bytes(width, height, masks_at_most)):
            with self.stage("decode"):
                image = await self.run_blocking(decode_image, data, s.max_image_pixels)
            image_key = hashlib.blake2b(data, digest_size=16).hexdigest()  # same bytes, same cached embedding
            del data  # only the pixels are needed from here on
            return await self._label_image(request, image, image_key)

    def _masks_wanted(self, config: ProjectConfig) -> bool:
        return self.segment is not None and bool(config.mask_outputs)

    async def _label_image(self, request: LabellingRequest, image: LoadedImage, image_key: str) -> dict[str, Any]:
        config, prompt, s = request.config, request.prompt, self.settings
        clicks = request.regions.in_pixels(image.width, image.height) if request.regions else None
        if clicks and prompt.source == "labels":  # clicks or a drawn box alone: SAM only, no detector
            return await self._segment_clicks(config, image, image_key, clicks)
        if not prompt.phrases:
            detections = Detections()
        else:
            with self.stage("detect"):
                detections = await self.detect(DetectionRequest(
                    image=image.pixels, phrases=[p.text for p in prompt.phrases],
                    box_threshold=request.thresholds.box, text_threshold=request.thresholds.text,
                    max_detections=1 if clicks else s.max_detections, priority=task_priority(),
                    image_key=image_key, encodings=mask_encodings(config) if self._masks_wanted(config) else (),
                    polygon_tolerance_px=s.polygon_tolerance_px,
                    **(exemplar_arrays(request.exemplars, request.exemplar_phrases, image.width, image.height)
                       | {"exemplar_threshold": request.thresholds.exemplar} if request.exemplars else {})))
        masks = None
        found_masks = detections.encoded is not None or detections.masks is not None
        if found_masks and not clicks:  # a concept model (SAM 3) found them with the boxes (encoded in its replica)
            if self._masks_wanted(config):
                masks = detections.encoded if detections.encoded is not None else \
                    Masks(masks=detections.masks, scores=detections.scores)
        elif self._masks_wanted(config) and len(detections):
            with self.stage("segment"):
                # with clicks, the best box and the clicks together refine one mask
                masks = await self.segment(SegmentationRequest(
                    image=image.pixels, boxes=detections.boxes, image_key=image_key,
                    points=clicks.points if clicks else None,
                    point_labels=clicks.point_labels if clicks else None, priority=task_priority(),
                    encodings=mask_encodings(config), polygon_tolerance_px=s.polygon_tolerance_px))
        with self.stage("results"):
            # off the event loop; RLE and polygons come from the segmenter replica when it ran in one
            return await self.run_blocking(functools.partial(
                build_prediction, config, prompt.phrases, detections, masks, width=image.width,
                height=image.height, model_version=self.model_version,
                polygon_tolerance_px=s.polygon_tolerance_px))

    async def _fetch(self, config: ProjectConfig, task: Any, fetcher: Any = None) -> bytes:
        url = task_url(config, task)
        fetcher = fetcher or self.fetcher
        with self.stage("fetch"):
            return await fetcher.fetch(fetcher.resolve(url, task.get("id")))

    async def _segment_clicks(self, config: ProjectConfig, image: LoadedImage, image_key: str,
                              clicks: Clicks) -> dict[str, Any]:
        if self.segment is None:
            raise BadRequest("clicks and drawn boxes need a segmenter: start the service with SEGMENTER_MODEL, USE_SAM or "
                             "USE_MOBILE_SAM (or SAM 3 as DETECTOR_MODEL)")
        label = click_label(config, clicks.label)
        with self.stage("segment"):
            segmented = await self.segment(SegmentationRequest(
                image=image.pixels, boxes=clicks.box, image_key=image_key,
                points=clicks.points if len(clicks.points) else None,
                point_labels=clicks.point_labels if len(clicks.points) else None, priority=task_priority(),
                encodings=mask_encodings(config), polygon_tolerance_px=self.settings.polygon_tolerance_px))
        with self.stage("results"):
            return await self.run_blocking(functools.partial(
                build_click_prediction, config, label, segmented, float(segmented.scores[0]),
                width=image.width, height=image.height, model_version=self.model_version,
                polygon_tolerance_px=self.settings.polygon_tolerance_px))

    @contextlib.contextmanager
    def stage(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.observe_stage is not None:
                self.observe_stage(name, time.perf_counter() - started)


def response_for(request: LabellingRequest, outcomes: list[TaskOutcome], model_version: str,
                 warnings: list[str] = ()) -> dict[str, Any]:
    """The /predict answer: one entry per task, in order."""
    response: dict[str, Any] = {"results": [o.prediction for o in outcomes], "model_version": model_version}
    # Label Studio reads only `results`; other clients (grounded-serve prelabel) learn which tasks failed.
    errors = [{"index": i, "task": echoable_id(_task_id(task)), "error": outcome.error}
              for i, (task, outcome) in enumerate(zip(request.tasks, outcomes)) if outcome.error]
    if errors:
        response["task_errors"] = errors
    warnings = [*request.prompt.warnings, *warnings]
    if warnings:
        response["warnings"] = warnings
    return response


def task_url(config: ProjectConfig, task: Any) -> Any:
    """The value the config's Image or Video tag reads from the task's data (a URL, unchecked)."""
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise BadRequest("the task has no 'data' object")
    url = task["data"].get(config.image_key)
    if url is None:
        tag = "Video" if config.video else "Image"
        raise BadRequest(f"the task's data has no {config.image_key!r} key (from the {tag} tag's value)")
    return url


def project_name(value: Any) -> str:
    """Label Studio's "<id>.<created-at>" as sent, or "" for anything else (long, unprintable, not a string)."""
    return value if isinstance(value, str) and len(value) <= 64 and value.isprintable() else ""


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def echoable_id(task_id: Any) -> int | str | None:
    """A task id as the answer may repeat it: Label Studio's ids are 64-bit integers; anything else (huge
    integers, long or unencodable strings, objects) is not echoed."""
    if isinstance(task_id, int) and not isinstance(task_id, bool) and -2**63 <= task_id < 2**64:
        return task_id
    if isinstance(task_id, str) and len(task_id) <= 256 and task_id.isprintable():
        try:
            task_id.encode("utf-8")
            return task_id
        except UnicodeEncodeError:  # a lone surrogate
            return None
    return None
