"""The ingress deployment: Label Studio's ML backend HTTP API, and the Ray calls into the model deployments.

Routes parse HTTP and map errors to status codes; the labelling itself is serve_app.ingress.pipeline,
given `_detect` and `_segment` (handle calls with one retry on a lost replica) as its model steps.
"""

# FastAPI must see real annotations (Request) on the ingress methods: no postponed evaluation.

import asyncio
import dataclasses
import functools
import json
import os
import re
import time
import uuid
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve_app import get_logger
from serve_app.ingress.auth import OPEN_PATHS, BasicAuth
from serve_app.deployments.job_claims import LEASE_S as JOB_CLAIMS_LEASE_S
from serve_app.ingress.claims import SharedClaims
from serve_app.ingress.cpu_pool import PriorityPool
from serve_app.ingress.errors import BadRequest, ServiceUnavailable
from serve_app.ingress.images import ImageFetcher, ImageSourcePolicy
from serve_app.ingress.instances import LabelStudioInstances, origin_text
from serve_app.ingress.jobs import JobBoard
from serve_app.ingress.label_config import parse_label_config
from serve_app.label_studio.credentials import LabelStudioCredentials, choose_credential
from serve_app.ingress.metrics import MetricsView
from serve_app.ingress.pipeline import LabellingPipeline, project_name, task_priority
from serve_app.label_studio.prediction_writer import PredictionWriter
from serve_app.models.messages import DetectionRequest, Detections, Masks, PromptUnsupported, SegmentationRequest
from serve_app.settings import Settings, url_problem
from serve_app.telemetry import IngressMetrics

logger = get_logger(__name__)

MODEL_CLASS = "GroundedSam"
# serve.status() costs ~40 ms of this replica's CPU (GIL held), so poll fast only until the models serve.
READINESS_POLL_S = 1.0
READY_POLL_S = 15.0
# Label Studio's webhook actions; anything else is counted as "other" so /metrics stays bounded.
WEBHOOK_ACTIONS = frozenset({
    "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED", "TASKS_CREATED", "TASKS_DELETED",
    "ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED", "START_TRAINING",
})

api = FastAPI(title="grounded-serve", description="Label Studio ML backend: Grounding DINO + SAM on Ray Serve")
api.state.basic_auth = None  # set by the Ingress constructor from the replica's environment


@api.middleware("http")
async def auth_and_last_resort(request: Request, call_next):
    auth = request.app.state.basic_auth
    if auth is not None and request.url.path not in OPEN_PATHS and not auth.allows(request.headers.get("authorization")):
        logger.warning("refused %s %s: missing or wrong Basic auth credentials", request.method, request.url.path)
        return auth.refusal()
    try:
        return await call_next(request)
    except Exception:  # noqa: BLE001 - a bug must still be a JSON answer, never Starlette's plain text
        reference = uuid.uuid4().hex[:12]
        logger.exception("unexpected error in %s %s (reference %s)", request.method, request.url.path, reference)
        return json_error(500, f"internal error (reference {reference} in the service log)")


def render_json(content: Any) -> bytes:
    """orjson (a /predict answer can hold megabytes of RLE), and where orjson refuses a value (an integer
    beyond 64 bits, a lone surrogate, deep nesting) the standard library with ASCII escapes: rendering the
    answer must never lose the work already done."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(content, ensure_ascii=True, default=_plain).encode()


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return render_json(content)


def json_error(status: int, message: str) -> JSONResponse:
    return SafeJSONResponse({"status": "error", "error": message}, status_code=status)


def model_version_for(settings: Settings) -> str:
    """Stable name of the models: Label Studio skips tasks that have a prediction of this version."""
    if settings.model_version:
        return settings.model_version
    dino = os.path.basename(settings.detector_model.rstrip("/")) or settings.detector_model
    version = f"grounded-serve:{dino}"
    if settings.segmenter_model:
        name = os.path.basename(settings.segmenter_model.rstrip("/"))
        version += "+" + re.sub(r"\.(pth|pt)$", "", name, flags=re.IGNORECASE)  # sam2.1-hiera-large keeps its dot
    elif settings.sam_enabled:
        checkpoint = os.path.splitext(os.path.basename(settings.segmenter_checkpoint))[0]
        version += f"+{'mobile_sam' if settings.use_mobile_sam else 'sam'}:{checkpoint}"
    return version


def setup_fields(body: dict, hostname: str, token: str) -> tuple[str, str]:
    """The Label Studio host and token a /setup body leaves in force. Empty or missing fields keep the current
    ones (grounded-serve prelabel sends both empty); anything else is checked before any state changes."""
    new_hostname, new_token = body.get("hostname"), body.get("access_token")
    if new_hostname not in (None, ""):
        if not isinstance(new_hostname, str):
            raise BadRequest("'hostname' must be a string")
        problem = url_problem(new_hostname.strip())
        if problem:
            raise BadRequest(f"'hostname' {new_hostname[:200]!r} {problem}")
        hostname = new_hostname.strip().rstrip("/")
    if new_token not in (None, ""):
        if not isinstance(new_token, str):
            raise BadRequest("'access_token' must be a string")
        token = new_token
    return hostname, token


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_LONG_NUMBER = re.compile(rb"\d{19}")  # an integer beyond 64 bits has at least 19 digits
STATUS_RECHECK_S = 1.0  # how often a retry after a replica loss asks whether a replica is still running


def running_replicas(status, app_name: str, deployment: str) -> int:
    """RUNNING replicas of `deployment` in a `serve.status()` answer. (Above the deployment class: Serve pickles
    it, with the module globals it uses, when the decorator runs.)"""
    application = status.applications.get(app_name)
    overview = application.deployments.get(deployment) if application else None
    return int(overview.replica_states.get("RUNNING", 0)) if overview else 0


async def awaited(response):
    """A DeploymentResponse's result as a coroutine, so it can be shielded and waited on as a task."""
    return await response


def parse_json(body: bytes) -> Any:
    """orjson where it means what the json module means: a parse holds the GIL throughout, so /health waits for
    it, and orjson parsed a 30 MB context a third faster. orjson turns integers beyond 64 bits into floats and
    refuses lone surrogate escapes and nesting beyond 1,024, which the json module keeps as they are, so that
    such a value fails only its own task: those bodies (any 19-digit run, or whatever orjson refuses) go to the
    json module. NaN and Infinity are refused either way."""
    if not _LONG_NUMBER.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_refuse_constant)


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: dict, detector: DeploymentHandle, segmenter: DeploymentHandle | None = None,
                 claims: DeploymentHandle | None = None):
        self.settings = Settings(**settings)
        self.settings.check_key_destination(os.environ)  # the replica's environment may differ from the driver's
        api.state.basic_auth = BasicAuth.from_environment()
        self.detector = detector
        separate_segmenter = segmenter is not None
        if self.settings.pipeline == "concept":
            segmenter = detector  # SAM 3 answers clicks from the image features it cached for the prompt
        self.segmenter = segmenter
        self.model_version = model_version_for(self.settings)
        self.metrics = IngressMetrics()
        # One client for every download, kept for the replica's life: /setup swaps credentials, not clients.
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.metrics_view = MetricsView(serve.get_replica_context().app_name, self.http)
        self.models_ready = {"detector": False, **({"segmenter": False} if separate_segmenter else {})}
        self.model_status: dict[str, dict[str, Any]] = {}
        self._status_lock = asyncio.Lock()  # serve.status() read for retries after a replica loss, shared
        self._status, self._status_read_at = None, float("-inf")
        self._readiness_task = asyncio.get_event_loop().create_task(self._watch_readiness())
        # Decoding and result building (RLE, polygons) hold the GIL much of the time. Many threads doing it at
        # once starve the event loop that feeds the model replicas, so this work gets few threads of its own.
        self._cpu_pool = PriorityPool(self.settings.ingress_cpu_threads)
        # Each Label Studio instance's projects are fetched and written back through that instance (its /setup);
        # requests of projects with no /setup seen go through the operator's LABEL_STUDIO_URL, if set.
        self.instances = LabelStudioInstances(self._make_fetcher, capacity=self.settings.max_label_studio_projects,
                                              ttl_s=self.settings.label_studio_project_ttl_s,
                                              pinned_origin=origin_text(self.settings.label_studio_url))
        self.pipeline = LabellingPipeline(
            settings=self.settings, model_version=self.model_version, detect=self._detect,
            segment=self._segment if segmenter is not None else None, fetcher=self._make_fetcher("", ""),
            run_blocking=self._run_blocking, observe_stage=self.metrics.observe_stage)
        # batch /predicts become jobs that outlive their request (serve_app.ingress.jobs)
        shared = SharedClaims(claims, serve.get_replica_context().replica_tag, JOB_CLAIMS_LEASE_S) \
            if claims is not None else None
        self.jobs = JobBoard(pipeline=self.pipeline, settings=self.settings, on_event=self._job_event, claims=shared)

    # -- plumbing -------------------------------------------------------------------------------

    def _make_fetcher(self, setup_hostname: str, setup_token: str) -> ImageFetcher:
        """The fetcher of one Label Studio instance: the operator's (LABEL_STUDIO_URL) when /setup named its origin or
        no host, else the /setup host with its own token, which must be public or in IMAGE_HOST_ALLOWLIST."""
        s = self.settings
        chosen = choose_credential(label_studio_url=s.label_studio_url, setup_hostname=setup_hostname,
                                   setup_token=setup_token, env=os.environ)
        operators = bool(s.label_studio_url) and (not setup_hostname or
                                                  origin_text(setup_hostname) == origin_text(s.label_studio_url))
        policy = ImageSourcePolicy(
            max_bytes=s.max_download_bytes, timeout_s=s.download_timeout_s, max_pixels=s.max_image_pixels,
            label_studio_url=s.label_studio_url if operators else setup_hostname, trust_label_studio_host=operators,
            document_root=s.local_files_document_root,
            host_allowlist=frozenset(h.strip().lower() for h in s.image_host_allowlist.split(",") if h.strip()),
        )
        # Secrets come from the replica's environment (or Label Studio's /setup), never from Serve config args,
        # and each goes only to the origin it was issued for.
        credentials = LabelStudioCredentials(chosen[0], chosen[1], self.http, chosen[2]) if chosen else None
        return ImageFetcher(policy, self.http, credentials)

    async def _writer(self, fetcher: ImageFetcher) -> PredictionWriter | None:
        """Where background jobs store predictions: the same Label Studio and credential as the request's downloads,
        reached under the same address rules (a /setup host must be public or in IMAGE_HOST_ALLOWLIST)."""
        if fetcher.credentials is None:
            return None
        try:
            await fetcher.connect_target(fetcher.credentials.base_url)
        except BadRequest as exc:
            logger.warning("background jobs cannot store predictions in %s: %s", fetcher.credentials.base_url, exc)
            return None
        return PredictionWriter(fetcher.credentials, route=fetcher.connect_target)

    def _job_event(self, event: str, n: int) -> None:
        self.metrics.count(event, n)
        self.metrics.observe_jobs(self.jobs.totals())

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
                    running = running_replicas(status, app_name, deployment)
                    self.models_ready[key] = running > 0
                    self.model_status[key] = {"status": str(overview.status.value), "running_replicas": running,
                                              **({"message": overview.message} if overview.message else {})}
            except Exception:  # noqa: BLE001 - the controller may be restarting; try again
                logger.debug("cannot read Serve status", exc_info=True)
            await asyncio.sleep(READY_POLL_S if all(self.models_ready.values()) else READINESS_POLL_S)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s, on the replica's event loop (user code runs there,
        RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0). A wedged loop never answers, the check times out, and
        Serve replaces the replica instead of leaving a service that accepts requests and answers none."""
        if self._readiness_task.done():  # /health would report stale model states for ever
            logger.warning("the model-readiness watcher stopped (%s); starting it again",
                           self._readiness_task.exception() if not self._readiness_task.cancelled() else "cancelled")
            self._readiness_task = asyncio.get_running_loop().create_task(self._watch_readiness())
        await asyncio.sleep(0)

    async def _read_json(self, request: Request) -> Any:
        """The body as JSON, bounded in bytes; anything unparsable is a 400 (or 413), never a 500."""
        limit = self.settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BadRequest(f"the request body is {declared} bytes; the limit is {limit} (MAX_REQUEST_BYTES)",
                             status_code=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the request body exceeds {limit} bytes (MAX_REQUEST_BYTES)", status_code=413)
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise BadRequest("the request body is empty; expected JSON")
        try:
            # off the event loop: a large body takes long enough to parse to hold up /health
            return await self._run_blocking(parse_json, body)
        except RecursionError:
            raise BadRequest("the request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN, integers beyond 4,300 digits
            raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None

    async def _run_blocking(self, function, *args):
        return await self._cpu_pool.run(task_priority(), functools.partial(function, *args))

    # -- background jobs -------------------------------------------------------------------------

    @api.get("/jobs")
    async def list_jobs(self, project: str = "", instance: str = "") -> JSONResponse:
        """Every job, or those of one project (`?project=3`) and Label Studio instance (`?instance=http://ls:8080`)."""
        return SafeJSONResponse({"jobs": self.jobs.summaries(project=project[:64], instance=instance[:256]),
                                 **self.jobs.totals()})

    @api.delete("/jobs/{job_id}")
    async def cancel_job(self, job_id: str) -> JSONResponse:
        if not self.jobs.cancel(job_id):
            return json_error(404, f"no running job {job_id[:64]!r} (GET /jobs lists them)")
        return SafeJSONResponse({"cancelled": job_id})

    # -- model calls ----------------------------------------------------------------------------

    async def _detect(self, request: DetectionRequest) -> Detections:
        return await self._call_model("Detector", self.detector.detect, request)

    async def _segment(self, request: SegmentationRequest) -> Masks:
        try:
            return await self._call_model("Segmenter", self.segmenter.segment, request)
        except PromptUnsupported as exc:  # Ray re-raises the replica's exception as a subclass of it
            raise BadRequest(str(getattr(exc, "cause", exc))) from None

    async def _call_model(self, name: str, method, request):
        """One model call. A replica that dies mid-request is retried once, on another replica or the one Serve
        starts in its place. If no replica of the deployment is running REPLICA_RETRY_TIMEOUT_S later, the request
        gets a 503; while one is, the retry is work queued or running there, and only the task's own timeout
        (TASK_TIMEOUT_S) bounds it: a busy CPU replica can take minutes, and cutting it would waste that work."""
        try:
            return await method.remote(request)
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {name} deployment is overloaded ({exc})") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            self.metrics.count(f"{name.lower()}_replica_failures")
            logger.warning("%s replica failed (%s); retrying once", name, exc.__class__.__name__)
        response = method.remote(request)
        retry = asyncio.ensure_future(awaited(response))
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(retry), timeout=self.settings.replica_retry_timeout_s)
            except asyncio.TimeoutError:
                logger.info("%s retry not answered after %g s: waiting while Serve reports a running replica", name,
                            self.settings.replica_retry_timeout_s)
            # Serve's status learns of a dead replica at its next health check, seconds later: ask again each second
            while not (await asyncio.wait({retry}, timeout=STATUS_RECHECK_S))[0]:
                if not await self._running_replicas(name):
                    raise ServiceUnavailable(
                        f"the {name} deployment lost a replica and none was running "
                        f"{self.settings.replica_retry_timeout_s:g} s later (REPLICA_RETRY_TIMEOUT_S)") from None
            return retry.result()
        except BackPressureError as exc:
            raise ServiceUnavailable(f"the {name} deployment is overloaded ({exc})") from None
        except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
            raise ServiceUnavailable(f"the {name} deployment failed twice: {exc.__class__.__name__}") from None
        finally:
            if not retry.done():  # a 503, or this task was cancelled: the replica must not go on with it
                retry.cancel()
                response.cancel()

    async def _running_replicas(self, name: str) -> int:
        """RUNNING replicas of a model deployment, from Serve's controller at most STATUS_RECHECK_S ago: every
        waiting retry shares one read (0 if the controller cannot answer)."""
        async with self._status_lock:
            if time.monotonic() - self._status_read_at >= STATUS_RECHECK_S:
                try:
                    self._status = await asyncio.to_thread(serve.status)
                except Exception:  # noqa: BLE001 - a controller that cannot answer counts as no replica
                    logger.warning("cannot read Serve status while retrying a %s call", name, exc_info=True)
                    self._status = None
                self._status_read_at = time.monotonic()
        if self._status is None:
            return 0
        return running_replicas(self._status, serve.get_replica_context().app_name, name)

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
                await self._run_blocking(parse_label_config, body["schema"])  # unservable configs fail here
            project = project_name(body.get("project"))
            hostname, token = setup_fields(body, "", "")
            if not hostname:  # empty fields keep what the project's last /setup said
                latest = self.instances.known(project)
                hostname = latest.hostname if latest else ""
            if not token:  # a token only ever from the same instance's /setup
                same = self.instances.known(project, hostname) if hostname else None
                token = same.token if same else ""
            if hostname or token:  # grounded-serve prelabel sends neither: nothing to remember
                # downloads in flight keep the fetcher they started with; the HTTP client is shared, never closed
                self.instances.setup(project, hostname, token)
        except BadRequest as exc:
            logger.warning("/setup refused: %s", exc)
            return json_error(exc.status_code, exc.message)
        return SafeJSONResponse({"model_version": self.model_version})

    @api.post("/webhook")
    async def webhook(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_json(request)
        except BadRequest as exc:
            return json_error(exc.status_code, exc.message)
        action = body.get("action") if isinstance(body, dict) else None
        known = action if action in WEBHOOK_ACTIONS else None
        self.metrics.count(f"webhook_{known or 'other'}")
        return SafeJSONResponse({"status": "ok", "action": known, "trained": False,
                                 "message": "zero-shot models: events are acknowledged, nothing is trained"})

    @api.get("/metrics")
    async def get_metrics(self) -> JSONResponse:
        return SafeJSONResponse({"model_version": self.model_version, "models_ready": dict(self.models_ready),
                                 "jobs": self.jobs.totals(), **await self.metrics_view.snapshot()})

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        self.metrics.count("predict_requests")
        try:
            parsed = await self.pipeline.parse_off_loop(await self._read_json(request))
            instance = await self.instances.sender(parsed, operator=self.pipeline.fetcher,
                                                   operator_url=self.settings.label_studio_url)
            fetcher = instance.fetcher if instance else self.pipeline.fetcher
            parsed = dataclasses.replace(parsed, fetcher=fetcher)
            if parsed.interactive:  # the editor shows this answer and stores nothing: no background job
                response = await self.pipeline.answer(parsed)
            else:
                response = await self.jobs.predict(parsed, await self._writer(fetcher), instance=(
                    instance.origin if instance else origin_text(self.settings.label_studio_url)))
                self.metrics.observe_jobs(self.jobs.totals())
        except BadRequest as exc:
            self.metrics.count("predict_request_errors")
            logger.warning("/predict refused (%d): %s", exc.status_code, exc)
            return json_error(exc.status_code, exc.message)
        except ServiceUnavailable as exc:
            # Nothing is returned, so Label Studio stores nothing and a later retrieval retries these tasks.
            self.metrics.count("predict_unavailable")
            logger.warning("/predict answered 503: %s", exc)
            answer = json_error(503, str(exc))
            answer.headers["Retry-After"] = str(exc.retry_after_s)
            return answer
        finally:
            self.metrics.observe_request("predict", time.perf_counter() - started)
        self.metrics.count("predict_tasks", len(response["results"]))
        self.metrics.count("task_errors", len(response.get("task_errors", ())))
        return SafeJSONResponse(response)
