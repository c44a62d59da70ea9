"""The tracker deployment (`detect+track` on videos): each video's objects carried from one sampled frame to the
next by a SAM 2-family video model (TRACKER_MODEL), with its own GPU fraction and autoscaling.

A video's session lives on one replica: every TrackStep names its video in `image_key`, and the affinity router
(serve_app.deployments.routing) sends all of a video's frames to the same replica. Sessions are sequential by
nature (frame n needs frame n-1's memory), so a replica runs several videos side by side rather than batching;
the detector still batches the sampled frames of every video. Defaults here, not in configs/serve.yaml: the app
has no Tracker unless TRACKER_MODEL is set, and Serve refuses a config naming a deployment the app lacks.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.config import RequestRouterConfig

from serve_app.deployments.replica_cores import lower_cpu_priority
from serve_app.deployments.replica_memory import release_free_memory
from serve_app.deployments.replica_placement import log_placement
from serve_app.deployments.routing import ImageAffinityRouter
from serve_app.graph_plan import ReplicaProcess, TrackerLimits
from serve_app.models.loading import load
from serve_app.models.messages import TrackedObjects, TrackStep
from serve_app.models.spec import ModelSpec
from serve_app.models.tracker_sessions import TrackerSessions


@serve.deployment(
    name="Tracker",
    max_ongoing_requests=32,  # one step per video at a time; more videos than TRACKER_MAX_SESSIONS are refused
    graceful_shutdown_timeout_s=300,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 10,
                        "downscale_delay_s": 300},
    request_router_config=RequestRouterConfig(request_router_class=ImageAffinityRouter),
)
class Tracker:
    def __init__(self, spec: ModelSpec, limits: TrackerLimits, process: ReplicaProcess = ReplicaProcess()):
        model = load(spec)
        if model.device.type == "cpu":
            lower_cpu_priority(process.cpu_niceness)
        self.sessions = TrackerSessions(model, max_sessions=limits.max_sessions, idle_s=limits.idle_s,
                                        max_objects=limits.max_objects, lost_after_s=limits.lost_after_s)
        release_free_memory()
        log_placement(type(self).__name__, model.device)

    async def step(self, request: TrackStep) -> TrackedObjects:
        return await asyncio.to_thread(self.sessions.step, request)
