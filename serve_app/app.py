"""The application builder `serve run configs/serve.yaml` imports: `serve_app.app:build_app`."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app import get_logger
from serve_app.deployments.detector import Detector
from serve_app.deployments.job_claims import JobClaims
from serve_app.deployments.routing import ImageAffinityRouter
from serve_app.deployments.segmenter import Segmenter
from serve_app.deployments.tracker import Tracker
from serve_app.ingress.app import Ingress
from serve_app.deployments.replica_memory import replica_env
from serve_app.gpu_placement import gpu_fractions, place
from serve_app.graph_plan import GraphPlan, plan_graph
from serve_app.settings import Settings

logger = get_logger(__name__)


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def use_gpus(settings: Settings) -> bool:
    """`auto` means GPU fractions when the cluster has GPUs now; autoscaling clusters that start with
    no GPU node should say ACCELERATOR=gpu so replicas ask for GPUs and the autoscaler adds them."""
    if settings.accelerator == "auto":
        return cluster_has_gpus()
    return settings.accelerator == "gpu"


def replicas_per_node(settings: Settings, *, gpus: bool) -> dict[str, Any]:
    """On CPU one model replica already uses every core of its node (serve_app.deployments.replica_cores), so a second
    one there only adds its loading and a third way to split the cores: measured on 2 cores, autoscaling's second
    Detector cut the service from 0.99 to 0.78-0.82 of the bare models' throughput (docs/performance.md). Capped
    per node, not in total, so replicas still scale out onto other nodes; GPU replicas share a GPU by fractions."""
    if gpus or not settings.cpu_replicas_per_node:
        return {}
    return {"max_replicas_per_node": settings.cpu_replicas_per_node}


def model_gpu_fractions(settings: Settings, plan: GraphPlan) -> dict[str, float]:
    """Deployment name -> GPU fraction per replica, `auto` ones an equal share of a GPU (serve_app.gpu_placement)."""
    configured = {"Detector": settings.detector_gpus, "Segmenter": settings.segmenter_gpus,
                  "Tracker": settings.tracker_gpus}
    roles = ["Detector"] + (["Segmenter"] if plan.segmenter is not None else []) + \
        (["Tracker"] if plan.tracker is not None else [])
    return gpu_fractions(roles, configured)


def warn_if_unplaceable(fractions: dict[str, float]) -> None:
    """One replica of each model on the GPUs the cluster has now: a replica that fits on none waits for a GPU
    forever unless an autoscaler adds one, and the service never becomes ready. Say so at build time."""
    import ray

    if not ray.is_initialized():
        return
    gpus_per_node = [int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")]
    if not any(gpus_per_node):
        return
    pending = place(fractions.items(), gpus_per_node).pending
    if pending:
        logger.warning("GPU fractions %s do not fit one replica of each model on this cluster's GPUs %s: %s "
                       "will wait for a GPU the cluster may never get (docs/gpu-placement.md); lower "
                       "DETECTOR_GPUS / SEGMENTER_GPUS / TRACKER_GPUS or leave them auto", fractions, gpus_per_node,
                       ", ".join(pending))


def model_actor_options(settings: Settings) -> dict[str, Any]:
    """The model replicas' runtime_env, when they need one: the malloc tunables (MODEL_MALLOC_REUSE) on top of the
    application's runtime_env. Serve gives a deployment that sets no runtime_env the application's, but one that sets
    its own keeps only that, except where configs/serve.yaml lists the deployment (the Segmenter is not listed: the
    app has none when SAM is off), so the application's is merged here as Serve merges it for listed ones."""
    env_vars = replica_env(settings.model_malloc_reuse)
    if not env_vars:
        return {}
    import ray

    application = dict(ray.get_runtime_context().runtime_env or {}) if ray.is_initialized() else {}
    return {"runtime_env": {**application, "env_vars": {**application.get("env_vars", {}), **env_vars}}}


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    settings = Settings.load(args)
    gpus = use_gpus(settings)
    settings = settings.with_defaults_for(gpus=gpus)
    plan = plan_graph(settings)
    logger.info("building grounded-serve: %s GPUs, %s pipeline, settings %s", "with" if gpus else "without",
                plan.pipeline, settings.to_dict())
    # SAM 3 answers the clicks too, from the image features it cached for the text prompt: route an image's
    # requests to the replica holding them, as the Segmenter's are
    routing = {"request_router_config": RequestRouterConfig(request_router_class=ImageAffinityRouter)} \
        if plan.concept else {}
    per_node = replicas_per_node(settings, gpus=gpus)
    model_env = model_actor_options(settings)
    fractions = model_gpu_fractions(settings, plan) if gpus else {}
    if gpus:
        warn_if_unplaceable(fractions)
    detector = Detector.options(ray_actor_options={
        "num_cpus": settings.detector_cpus, "num_gpus": fractions.get("Detector", 0), **model_env,
    }, **routing, **per_node).bind(plan.detector, plan.process)
    segmenter = None
    if plan.segmenter is not None:
        segmenter = Segmenter.options(ray_actor_options={
            "num_cpus": settings.segmenter_cpus, "num_gpus": fractions.get("Segmenter", 0), **model_env,
        }, **per_node).bind(plan.segmenter, plan.process)
    tracker = None
    if plan.tracker is not None:
        tracker = Tracker.options(ray_actor_options={
            "num_cpus": settings.tracker_cpus, "num_gpus": fractions.get("Tracker", 0), **model_env,
        }, **per_node).bind(plan.tracker, plan.tracker_limits, plan.process)
    # every ingress replica's background jobs claim their tasks in one place (serve_app.ingress.claims)
    return Ingress.bind(settings, plan, detector, segmenter, JobClaims.bind(), tracker)
