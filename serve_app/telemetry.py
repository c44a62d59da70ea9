"""The service's own metrics, recorded with `ray.serve.metrics` where the work happens.

Serve tags each series with its application, deployment and replica, and Ray exports them on every node's
Prometheus endpoint (`ray_` prefix added: `ray_grounded_serve_batch_size_bucket{deployment="Detector"}`) next
to Serve's own `ray_serve_*` metrics, so Ray's Grafana dashboards and any Prometheus can chart them. The
ingress's `GET /metrics` JSON is a view of these same series (serve_app.ingress.metrics), not a second count.
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "grounded_serve_"
BATCH_SIZE = PREFIX + "batch_size"
QUEUE_WAIT = PREFIX + "queue_wait_seconds"
CACHE_LOOKUPS = PREFIX + "embedding_cache_lookups"
CACHE_BYTES = PREFIX + "embedding_cache_bytes"
CACHE_ENTRIES = PREFIX + "embedding_cache_entries"
IMAGES_ENCODED = PREFIX + "images_encoded"
EVENTS = PREFIX + "events"
REQUEST_SECONDS = PREFIX + "request_seconds"
STAGE_SECONDS = PREFIX + "stage_seconds"
JOB_TASKS = PREFIX + "job_tasks"
RUNNING_JOBS = PREFIX + "running_jobs"

# Exact sizes up to 16 (the usual max_batch_size range), coarser above.
BATCH_SIZE_BOUNDARIES = [float(n) for n in range(1, 17)] + [24.0, 32.0, 48.0, 64.0]
SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class ModelMetrics:
    """What a model deployment reports: batch sizes and how long items waited for the model."""

    def __init__(self) -> None:
        self.batch_size = Histogram(BATCH_SIZE, description="Items per model forward pass",
                                    boundaries=BATCH_SIZE_BOUNDARIES)
        self.queue_wait = Histogram(QUEUE_WAIT, description="Seconds an item waited in the replica for the model",
                                    boundaries=SECONDS_BOUNDARIES)

    def observe_batch(self, size: int, waits_s: list[float]) -> None:
        self.batch_size.observe(size)
        for wait in waits_s:
            self.queue_wait.observe(wait)


class EmbeddingCacheMetrics:
    """The segmenter's embedding cache: lookups by result, its size, and encoder runs."""

    def __init__(self) -> None:
        self.lookups = Counter(CACHE_LOOKUPS, description="Embedding cache lookups", tag_keys=("result",))
        self.bytes = Gauge(CACHE_BYTES, description="Bytes of cached image embeddings")
        self.entries = Gauge(CACHE_ENTRIES, description="Cached image embeddings")
        self.images_encoded = Counter(IMAGES_ENCODED, description="Images run through the image encoder")

    def observe(self, hits: int, misses: int, encoded: int, entries: int, nbytes: int) -> None:
        if hits:
            self.lookups.inc(hits, tags={"result": "hit"})
        if misses:
            self.lookups.inc(misses, tags={"result": "miss"})
        if encoded:
            self.images_encoded.inc(encoded)
        self.entries.set(entries)
        self.bytes.set(nbytes)


class CacheReporter:
    """Exports a model's embedding-cache counters (`model.cache`, `model.images_encoded`) after each batch."""

    def __init__(self, model) -> None:
        self.model = model
        self.metrics = EmbeddingCacheMetrics()
        self._reported = {"hits": 0, "misses": 0, "images_encoded": 0}

    def __call__(self) -> None:
        stats = {**self.model.cache.stats(), "images_encoded": self.model.images_encoded}
        delta = {name: stats[name] - self._reported[name] for name in self._reported}
        self._reported = {name: stats[name] for name in self._reported}
        self.metrics.observe(hits=delta["hits"], misses=delta["misses"], encoded=delta["images_encoded"],
                             entries=stats["entries"], nbytes=stats["bytes"])


class IngressMetrics:
    """Requests, tasks and their outcomes as the ingress saw them, and time per pipeline stage."""

    def __init__(self) -> None:
        self.events = Counter(EVENTS, description="Ingress events (requests, tasks, errors, webhooks)",
                              tag_keys=("event",))
        self.request_seconds = Histogram(REQUEST_SECONDS, description="Seconds per HTTP request",
                                         boundaries=SECONDS_BOUNDARIES, tag_keys=("route",))
        self.stage_seconds = Histogram(STAGE_SECONDS, description="Seconds per pipeline stage of one task",
                                       boundaries=SECONDS_BOUNDARIES, tag_keys=("stage",))
        self.job_tasks = Gauge(JOB_TASKS, description="Tasks of the background jobs in GET /jobs, by state",
                               tag_keys=("state",))
        self.running_jobs = Gauge(RUNNING_JOBS, description="Background jobs still running")

    def count(self, event: str, n: int = 1) -> None:
        if n:
            self.events.inc(n, tags={"event": event})

    def observe_request(self, route: str, seconds: float) -> None:
        self.request_seconds.observe(seconds, tags={"route": route})

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.observe(seconds, tags={"stage": stage})

    def observe_jobs(self, totals: dict[str, int]) -> None:
        self.running_jobs.set(totals["running_jobs"])
        for state in ("pending", "stored", "failed"):
            self.job_tasks.set(totals[f"{state}_tasks"], tags={"state": state})
