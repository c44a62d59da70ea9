"""The ingress deployment: Label Studio's ML backend HTTP API over the model deployments."""

# FastAPI must see real annotations (Request) on the ingress methods: no postponed evaluation.

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app.ingress.auth import OPEN_PATHS, BasicAuth
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy, decode_image
from serve_app.ingress.interactive import Clicks, click_label, clicks_from_context
from serve_app.ingress.label_config import THRESHOLD_NUMBERS, ProjectConfig, parse_label_config
from serve_app.ingress.label_studio_auth import LabelStudioCredentials
from serve_app.ingress.metrics import ServiceMetrics
from serve_app.ingress.prompts import Prompt, parse_prompt, prompt_from_labels, prompt_text_from_context
from serve_app.ingress.results import build_click_prediction, build_prediction, empty_prediction
from serve_app.models.messages import DetectionRequest, SegmentationRequest
from serve_app.settings import Settings

logger = logging.getLogger("ray.serve")

MODEL_CLASS = "GroundedSam"
# serve.status() costs ~40 ms of this replica's CPU (GIL held), so poll fast only until the models serve.
READINESS_POLL_S = 1.0
READY_POLL_S = 15.0

api = FastAPI(title="grounded-serve", description="Label Studio ML backend: Grounding DINO + SAM on Ray Serve")
api.state.basic_auth = None  # set by the Ingress constructor from the replica's environment


@api.middleware("http")
async def require_basic_auth(request: Request, call_next):
    auth = request.app.state.basic_auth
    if auth is not None and request.url.path not in OPEN_PATHS and not auth.allows(request.headers.get("authorization")):
        logger.warning("refused %s %s: missing or wrong Basic auth credentials", request.method, request.url.path)
        return auth.refusal()
    return await call_next(request)


class ServiceUnavailable(Exception):
    """The models cannot take this request now (overloaded, or a replica died twice): retry later."""

    def __init__(self, message: str, retry_after_s: int = 10):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def model_version_for(settings: Settings) -> str:
    """Stable name of the models: Label Studio skips tasks that have a prediction of this version."""
    if settings.model_version:
        return settings.model_version
    dino = os.path.basename(settings.grounding_dino_model.rstrip("/")) or settings.grounding_dino_model
    version = f"grounded-serve:{dino}"
    if settings.sam_enabled:
        checkpoint = os.path.splitext(os.path.basename(settings.segmenter_checkpoint))[0]
        version += f"+{'mobile_sam' if settings.use_mobile_sam else 'sam'}:{checkpoint}"
    return version


def _threshold(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadRequest(f"{name} must be a number between 0 and 1, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise BadRequest(f"{name} must be between 0 and 1, got {number}")
    return number


def resolve_thresholds(settings: Settings, config: ProjectConfig, context: Any) -> dict[str, float]:
    """Environment defaults < the config's Number tags' defaultValue < numbers sent in the context."""
    thresholds = {"box_threshold": settings.box_threshold, "text_threshold": settings.text_threshold}
    thresholds.update(config.thresholds)
    results = context.get("result") if isinstance(context, dict) else None
    for item in results if isinstance(results, list) else []:
        if isinstance(item, dict) and item.get("type") == "number" and item.get("from_name") in THRESHOLD_NUMBERS:
            value = (item.get("value") or {}).get("number")
            thresholds[item["from_name"]] = _threshold(value, item["from_name"])
    return thresholds


async def _awaited(response):
    return await response


class FastJSONResponse(JSONResponse):
    """orjson instead of json: a /predict answer can hold megabytes of RLE integers (20x faster to write)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": message}, status_code=status)


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: dict, detector: DeploymentHandle, segmenter: DeploymentHandle | None = None):
        self.settings = Settings(**settings)
        api.state.basic_auth = BasicAuth.from_environment()
        self.detector = detector
        self.segmenter = segmenter
        self.model_version = model_version_for(self.settings)
        self.metrics = ServiceMetrics()
        self._setup_hostname = ""
        self._setup_token = ""
        self.fetcher = self._make_fetcher()
        self.models_ready = {"detector": False, **({"segmenter": False} if segmenter else {})}
        self.model_status: dict[str, dict[str, Any]] = {}
        self._readiness_task = asyncio.get_event_loop().create_task(self._watch_readiness())
        # Decoding and result building (RLE, polygons) hold the GIL much of the time. Many threads doing it at
        # once starve the event loop that feeds the model replicas, so this work gets few threads of its own.
        self._cpu_pool = concurrent.futures.ThreadPoolExecutor(self.settings.ingress_cpu_threads,
                                                               thread_name_prefix="ingress-cpu")

    # -- plumbing -------------------------------------------------------------------------------

    def _make_fetcher(self) -> ImageFetcher:
        s = self.settings
        base_url = s.label_studio_url or self._setup_hostname
        policy = ImageSourcePolicy(
            max_bytes=s.max_download_bytes, timeout_s=s.download_timeout_s, max_pixels=s.max_image_pixels,
            label_studio_url=base_url, trust_label_studio_host=bool(s.label_studio_url),
            document_root=s.local_files_document_root,
            host_allowlist=frozenset(h.strip().lower() for h in s.image_host_allowlist.split(",") if h.strip()),
        )
        client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        # Secrets come from the replica's environment (or Label Studio's /setup), never from Serve config args.
        key, source = "", ""
        for name in ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"):
            if os.environ.get(name):
                key, source = os.environ[name], name
                break
        if not key and self._setup_token:
            key, source = self._setup_token, "the access_token Label Studio sent to /setup"
        credentials = LabelStudioCredentials(base_url, key, client, source) if key and base_url else None
        return ImageFetcher(policy, client, credentials)

    async def _watch_readiness(self) -> None:
        """/health must answer within Label Studio's 1 s even while model replicas load (or fail to),
        so the model deployments' state is polled from Serve here rather than on each request."""
        app_name = serve.get_replica_context().app_name
        names = {"Detector": "detector", "Segmenter": "segmenter"}
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app_name].deployments
                for deployment, key in names.items():
                    if key not in self.models_ready or deployment not in deployments:
                        continue
                    overview = deployments[deployment]
                    running = overview.replica_states.get("RUNNING", 0)
                    self.models_ready[key] = running > 0
                    self.model_status[key] = {"status": str(overview.status.value), "running_replicas": running,
                                              **({"message": overview.message} if overview.message else {})}
            except Exception:  # noqa: BLE001 - the controller may be restarting; try again
                logger.debug("cannot read Serve status", exc_info=True)
            await asyncio.sleep(READY_POLL_S if all(self.models_ready.values()) else READINESS_POLL_S)

    @staticmethod
    async def _read_json(request: Request) -> Any:
        body = await request.body()
        if not body:
            raise BadRequest("the request body is empty; expected JSON")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not valid JSON: {exc}") from None

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/")
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                "models_ready": dict(self.models_ready), "models": dict(self.model_status)}

    @api.post("/setup")
    async def setup(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise BadRequest("the /setup body must be a JSON object")
            if body.get("schema"):
                parse_label_config(body["schema"])  # a config we cannot serve fails at connect time
            hostname, token = body.get("hostname") or "", body.get("access_token") or ""
            if (hostname, token) != (self._setup_hostname, self._setup_token) and isinstance(hostname, str):
                self._setup_hostname, self._setup_token = hostname, str(token)
                old, self.fetcher = self.fetcher, self._make_fetcher()
                asyncio.get_running_loop().create_task(old.aclose())
        except BadRequest as exc:
            logger.warning("/setup refused: %s", exc)
            return _json_error(exc.status_code, exc.message)
        return JSONResponse({"model_version": self.model_version})

    @api.post("/webhook")
    async def webhook(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_json(request)
        except BadRequest as exc:
            return _json_error(exc.status_code, exc.message)
        action = body.get("action") if isinstance(body, dict) else None
        self.metrics.count(f"webhook_{action or 'unknown'}")
        return JSONResponse({"status": "ok", "action": action, "trained": False,
                             "message": "zero-shot models: events are acknowledged, nothing is trained"})

    @api.get("/metrics")
    async def get_metrics(self) -> dict[str, Any]:
        return {"model_version": self.model_version, "models_ready": dict(self.models_ready),
                **self.metrics.snapshot()}

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        self.metrics.count("predict_requests")
        try:
            body = await self._read_json(request)
            response = await self._predict(body)
        except BadRequest as exc:
            self.metrics.count("predict_request_errors")
            logger.warning("/predict refused (%d): %s", exc.status_code, exc)
            return _json_error(exc.status_code, exc.message)
        except ServiceUnavailable as exc:
            # Nothing is returned, so Label Studio stores nothing and a later retrieval retries these tasks.
            self.metrics.count("predict_unavailable")
            logger.warning("/predict answered 503: %s", exc)
            response = _json_error(503, str(exc))
            response.headers["Retry-After"] = str(exc.retry_after_s)
            return response
        finally:
            self.metrics.observe_latency("predict", time.perf_counter() - started)
        return FastJSONResponse(response)

    # -- prediction -----------------------------------------------------------------------------

    async def _predict(self, body: Any) -> dict[str, Any]:
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
        config = parse_label_config(body.get("label_config"))
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context")
        text = prompt_text_from_context(context, config)
        if text is None:
            prompt = prompt_from_labels(config, s.max_phrases)
        else:
            prompt = parse_prompt(text, config, s.max_prompt_chars, s.max_phrases)
        thresholds = resolve_thresholds(s, config, context)
        for warning in prompt.warnings:
            logger.info("prompt: %s", warning)

        limit = asyncio.Semaphore(s.task_concurrency)

        async def bounded(task: Any) -> dict[str, Any]:
            async with limit:
                return await self._predict_task(task, config, prompt, thresholds, context)

        try:
            async with asyncio.TaskGroup() as group:  # a ServiceUnavailable cancels the request's other tasks
                running = [group.create_task(bounded(task)) for task in tasks]
        except* ServiceUnavailable as failures:
            raise failures.exceptions[0] from None
        outcomes = [task.result() for task in running]
        self.metrics.count("predict_tasks", len(tasks))
        response: dict[str, Any] = {"results": [prediction for prediction, _ in outcomes],
                                    "model_version": self.model_version}
        # Label Studio reads only `results`; other clients (grounded-serve prelabel) learn which tasks failed.
        errors = [{"index": i, "task": task.get("id") if isinstance(task, dict) else None, "error": error}
                  for i, (task, (_, error)) in enumerate(zip(tasks, outcomes)) if error]
        if errors:
            response["task_errors"] = errors
        if prompt.warnings:
            response["warnings"] = list(prompt.warnings)
        return response

    async def _predict_task(self, task: Any, config: ProjectConfig, prompt: Prompt,
                            thresholds: dict[str, float], context: Any) -> tuple[dict[str, Any], str | None]:
        """The task's prediction and, when it failed, why (it then gets an empty prediction)."""
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            return await asyncio.wait_for(self._run_task(task, config, prompt, thresholds, context),
                                          timeout=self.settings.task_timeout_s), None
        except BadRequest as exc:
            error = str(exc)
            logger.warning("task %s: %s", task_id, exc)
        except ServiceUnavailable:
            raise
        except asyncio.TimeoutError:
            error = f"no result within {self.settings.task_timeout_s:g} s (TASK_TIMEOUT_S)"
            logger.error("task %s: %s", task_id, error)
        except Exception as exc:  # noqa: BLE001 - one broken task must not lose the others
            error = f"internal error: {exc.__class__.__name__}"
            logger.exception("task %s failed", task_id)
        self.metrics.count("task_errors")
        return empty_prediction(self.model_version), error

    async def _call_model(self, name: str, method, request):
        """One model call. A replica that dies mid-request is retried once, on another replica or the one Serve
        starts in its place, for at most REPLICA_RETRY_TIMEOUT_S; after that the request gets a 503."""
        try:
            return await method.remote(request)
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {name} deployment is overloaded ({exc})") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            self.metrics.count(f"{name.lower()}_replica_failures")
            logger.warning("%s replica failed (%s); retrying once", name, exc.__class__.__name__)
        retry = method.remote(request)
        try:
            return await asyncio.wait_for(_awaited(retry), timeout=self.settings.replica_retry_timeout_s)
        except asyncio.TimeoutError:
            retry.cancel()
            raise ServiceUnavailable(f"the {name} deployment lost a replica and none was back within "
                                     f"{self.settings.replica_retry_timeout_s:g} s (REPLICA_RETRY_TIMEOUT_S)") from None
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {name} deployment is overloaded ({exc})") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise ServiceUnavailable(f"the {name} deployment failed twice: {exc.__class__.__name__}") from None

    async def _run_task(self, task: Any, config: ProjectConfig, prompt: Prompt,
                        thresholds: dict[str, float], context: Any = None) -> dict[str, Any]:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise BadRequest("the task has no 'data' object")
        url = task["data"].get(config.image_key)
        if url is None:
            raise BadRequest(f"the task's data has no {config.image_key!r} key (from the Image tag's value)")
        resolved = self.fetcher.resolve(url, task.get("id"))
        data = await self.fetcher.fetch(resolved)
        image = await self._on_cpu_pool(decode_image, data, self.settings.max_image_pixels)
        image_key = hashlib.blake2b(data, digest_size=16).hexdigest()  # same bytes, same cached embedding
        clicks = clicks_from_context(context, image.width, image.height)
        if clicks and prompt.source == "labels":  # clicks or a drawn box alone: SAM only, no detector
            return await self._segment_clicks(config, image, image_key, clicks)
        if not prompt.phrases:
            return build_prediction(config, prompt.phrases, [], [], [], None, image.width, image.height,
                                    self.model_version)

        detections, batch_size = await self._call_model("Detector", self.detector.detect, DetectionRequest(
            image=image.pixels, phrases=[p.text for p in prompt.phrases],
            box_threshold=thresholds["box_threshold"], text_threshold=thresholds["text_threshold"],
            max_detections=1 if clicks else self.settings.max_detections))
        self.metrics.observe_batch("Detector", batch_size)

        masks = None
        if self.segmenter is not None and config.mask_outputs and len(detections):
            # with clicks, the best box and the clicks together refine one mask
            request = SegmentationRequest(image=image.pixels, boxes=detections.boxes, image_key=image_key,
                                          points=clicks.points if clicks else None,
                                          point_labels=clicks.point_labels if clicks else None)
            masks = (await self._segment(request)).masks
        # RLE and polygons are CPU work: off the event loop, so other requests and /health are not held up
        return await self._on_cpu_pool(build_prediction, config, prompt.phrases, detections.boxes, detections.scores,
                                       detections.phrase_ids, masks, image.width, image.height, self.model_version,
                                       self.settings.polygon_tolerance_px)

    async def _on_cpu_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._cpu_pool, functools.partial(function, *args))

    async def _segment(self, request: SegmentationRequest):
        segmented, batch_size, cache = await self._call_model("Segmenter", self.segmenter.segment, request)
        self.metrics.observe_batch("Segmenter", batch_size)
        self.metrics.observe_embedding_cache(segmented.cache_hit, cache)
        return segmented

    async def _segment_clicks(self, config: ProjectConfig, image, image_key: str, clicks: Clicks) -> dict[str, Any]:
        if self.segmenter is None:
            raise BadRequest("clicks and drawn boxes need SAM: start the service with USE_SAM or USE_MOBILE_SAM")
        label = click_label(config, clicks.label)
        segmented = await self._segment(SegmentationRequest(
            image=image.pixels, boxes=clicks.box, image_key=image_key,
            points=clicks.points if len(clicks.points) else None,
            point_labels=clicks.point_labels if len(clicks.points) else None))
        return await self._on_cpu_pool(build_click_prediction, config, label, segmented.masks[0],
                                       segmented.scores[0], image.width, image.height, self.model_version,
                                       self.settings.polygon_tolerance_px)
