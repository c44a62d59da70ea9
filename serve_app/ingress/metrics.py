"""JSON counters for `GET /metrics`, kept by each ingress replica.

Batch sizes are reported by the model deployments with every result, so the histogram counts
the items this replica sent by the size of the batch they ran in. Ray Serve's Prometheus
metrics (`grounded_serve_*_batch_size`) cover all callers cluster-wide.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np

LATENCY_WINDOW = 2048  # recent requests kept for percentiles; bounded memory
REPLICAS_KEPT = 32  # segmenter replicas whose cache statistics are shown; autoscaling churns replica ids


class ServiceMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.counters: collections.Counter[str] = collections.Counter()
        self.batch_sizes: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self._latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=LATENCY_WINDOW))
        self.embedding_cache_by_replica: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

    def observe_embedding_cache(self, hit: bool, replica_stats: dict[str, Any]) -> None:
        """Lookups as this ingress saw them, and the latest statistics each segmenter replica reported."""
        with self._lock:
            self.counters["sam_cache_hits" if hit else "sam_cache_misses"] += 1
            stats = dict(replica_stats)
            replica = str(stats.pop("replica", ""))
            self.embedding_cache_by_replica[replica] = stats
            self.embedding_cache_by_replica.move_to_end(replica)
            while len(self.embedding_cache_by_replica) > REPLICAS_KEPT:
                self.embedding_cache_by_replica.popitem(last=False)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def observe_latency(self, route: str, seconds: float) -> None:
        with self._lock:
            self._latencies[route].append(seconds)

    def observe_batch(self, deployment: str, batch_size: int) -> None:
        with self._lock:
            self.batch_sizes[deployment][int(batch_size)] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = {}
            for route, values in self._latencies.items():
                array = np.fromiter(values, float)
                latency[route] = {
                    "count": int(array.size),
                    "mean_s": float(array.mean()),
                    "p50_s": float(np.percentile(array, 50)),
                    "p95_s": float(np.percentile(array, 95)),
                    "max_s": float(array.max()),
                }
            batches = {}
            for deployment, histogram in self.batch_sizes.items():
                items = sum(histogram.values())
                batches[deployment] = {
                    "items_by_batch_size": {str(k): v for k, v in sorted(histogram.items())},
                    "max": max(histogram),
                    "mean": sum(k * v for k, v in histogram.items()) / items,
                }
            return {
                "uptime_s": time.time() - self.started,
                "counters": dict(self.counters),
                "latency": latency,
                "batch_sizes": batches,
                "sam_embedding_cache": {"hits": self.counters["sam_cache_hits"],
                                        "misses": self.counters["sam_cache_misses"],
                                        "replicas": {k: dict(v) for k, v in self.embedding_cache_by_replica.items()}},
            }
