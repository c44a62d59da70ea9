"""The ingress deployment: Label Studio's ML backend HTTP API, routes only.

Routes parse HTTP and map errors to status codes. The labelling itself is serve_app.ingress.pipeline, given one
client per model role (serve_app.ingress.model_clients) as its model steps; the graph plan (serve_app.graph_plan)
says which deployment plays each role.
"""

# FastAPI must see real annotations (Request) on the ingress methods: no postponed evaluation.

import dataclasses
import functools
import os
import time
import uuid
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import get_logger
from serve_app.deployments.job_claims import LEASE_S as JOB_CLAIMS_LEASE_S
from serve_app.graph_plan import DETECTOR_DEPLOYMENT, SEGMENTER_DEPLOYMENT, TRACKER_DEPLOYMENT, GraphPlan
from serve_app.ingress.auth import OPEN_PATHS, BasicAuth
from serve_app.ingress.claims import SharedClaims
from serve_app.ingress.connections import fetcher_for, writer_for
from serve_app.ingress.cpu_pool import PriorityPool
from serve_app.ingress.errors import BadRequest, ServiceUnavailable
from serve_app.ingress.instances import LabelStudioInstances, origin_text
from serve_app.ingress.jobs import JobBoard
from serve_app.ingress.json_codec import SafeJSONResponse, json_error, read_json
from serve_app.ingress.label_config import parse_label_config
from serve_app.ingress.metrics import MetricsView
from serve_app.ingress.model_clients import ModelClient, ServeStatus
from serve_app.ingress.pipeline import LabellingPipeline, project_name, task_priority
from serve_app.ingress.readiness import ModelReadiness
from serve_app.settings import Settings
from serve_app.telemetry import IngressMetrics

logger = get_logger(__name__)

MODEL_CLASS = "GroundedSam"
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


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, settings: Settings, plan: GraphPlan, detector: DeploymentHandle,
                 segmenter: DeploymentHandle | None = None, claims: DeploymentHandle | None = None,
                 tracker: DeploymentHandle | None = None):
        self.settings, self.plan = settings, plan
        settings.check_key_destination(os.environ)  # the replica's environment may differ from the driver's
        api.state.basic_auth = BasicAuth.from_environment()
        self.model_version = plan.model_version
        self.metrics = IngressMetrics()
        # One client for every download, kept for the replica's life: /setup swaps credentials, not clients.
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.metrics_view = MetricsView(serve.get_replica_context().app_name, self.http)
        self._serve_status = ServeStatus()  # one status read shared by every retry after a replica loss
        self.readiness = ModelReadiness({"detector": DETECTOR_DEPLOYMENT,
                                         **({"segmenter": SEGMENTER_DEPLOYMENT} if segmenter is not None else {}),
                                         **({"tracker": TRACKER_DEPLOYMENT} if tracker is not None else {})})
        # Decoding and result building (RLE, polygons) hold the GIL much of the time. Many threads doing it at
        # once starve the event loop that feeds the model replicas, so this work gets few threads of its own.
        self._cpu_pool = PriorityPool(settings.ingress_cpu_threads)
        # Each Label Studio instance's projects are fetched and written back through that instance (its /setup);
        # requests of projects with no /setup seen go through the operator's LABEL_STUDIO_URL, if set.
        make_fetcher = functools.partial(fetcher_for, settings, self.http)
        self.instances = LabelStudioInstances(make_fetcher, capacity=settings.max_label_studio_projects,
                                              ttl_s=settings.label_studio_project_ttl_s,
                                              pinned_origin=origin_text(settings.label_studio_url))
        self.pipeline = LabellingPipeline(
            settings=settings, model_version=self.model_version,
            detect=self._client(DETECTOR_DEPLOYMENT, detector, "detect"),
            segment=self._client(plan.clicks_deployment, detector if plan.concept else segmenter, "segment"),
            fetcher=make_fetcher("", ""), run_blocking=self._run_blocking, observe_stage=self.metrics.observe_stage,
            exemplars=plan.exemplars, track=self._client(TRACKER_DEPLOYMENT, tracker, "step"),
            track_detects=plan.tracker_detects)
        # batch /predicts become jobs that outlive their request (serve_app.ingress.jobs)
        shared = SharedClaims(claims, serve.get_replica_context().replica_tag, JOB_CLAIMS_LEASE_S) \
            if claims is not None else None
        self.jobs = JobBoard(pipeline=self.pipeline, settings=settings, on_event=self._job_event, claims=shared)

    def _client(self, deployment: str | None, handle: DeploymentHandle | None, method: str) -> ModelClient | None:
        if deployment is None or handle is None:
            return None
        return ModelClient(deployment, handle, method, status=self._serve_status,
                           retry_timeout_s=self.settings.replica_retry_timeout_s,
                           on_replica_failure=lambda name: self.metrics.count(f"{name.lower()}_replica_failures"))

    def _job_event(self, event: str, n: int) -> None:
        self.metrics.count(event, n)
        self.metrics.observe_jobs(self.jobs.totals())

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s, on the replica's event loop (user code runs there,
        RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0). A wedged loop never answers, the check times out, and
        Serve replaces the replica instead of leaving a service that accepts requests and answers none."""
        self.readiness.keep_watching()

    async def _read_json(self, request: Request) -> Any:
        return await read_json(request, self.settings.max_request_bytes, self._run_blocking)

    async def _run_blocking(self, function, *args):
        return await self._cpu_pool.run(task_priority(), functools.partial(function, *args))

    # -- routes ---------------------------------------------------------------------------------

    @api.get("/")
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "UP", "model_class": MODEL_CLASS, "model_version": self.model_version,
                "models_ready": dict(self.readiness.ready), "models": dict(self.readiness.status)}

    @api.post("/setup")
    async def setup(self, request: Request) -> JSONResponse:
        try:
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise BadRequest("the /setup body must be a JSON object")
            if body.get("schema"):
                # unservable configs fail here
                await self._run_blocking(parse_label_config, body["schema"], self.settings.exemplar_control)
            self.instances.apply_setup(project_name(body.get("project")), body)
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
        return SafeJSONResponse({"model_version": self.model_version, "models_ready": dict(self.readiness.ready),
                                 "jobs": self.jobs.totals(), **await self.metrics_view.snapshot()})

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
                response = await self.jobs.predict(parsed, await writer_for(fetcher), instance=(
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
