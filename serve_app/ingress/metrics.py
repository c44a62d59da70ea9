"""`GET /metrics`: a small JSON view of the service's Prometheus series, for tests and humans.

The numbers are the ones serve_app.telemetry records, read back from Ray's Prometheus endpoint on every
live node (the addresses come from `ray.nodes()`) and summed over replicas. They lag the work by Ray's
metrics report interval (`RAY_metrics_report_interval_ms`, 10 s by default).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Awaitable, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_app import telemetry

RAY_PREFIX = "ray_"  # Ray prefixes application metrics when it exports them
NODES_TTL_S = 30.0
SCRAPE_TIMEOUT_S = 2.0


def metrics_addresses() -> list[str]:
    """host:port of the Prometheus endpoint of every live node in the cluster."""
    import ray

    return [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}" for node in ray.nodes()
            if node.get("Alive") and node.get("MetricsExportPort")]


class MetricsView:
    def __init__(self, app_name: str, client: httpx.AsyncClient,
                 addresses: Callable[[], Awaitable[list[str]]] | None = None):
        self.app_name = app_name
        self.client = client
        self._addresses = addresses or (lambda: asyncio.to_thread(metrics_addresses))
        self._known: tuple[float, list[str]] = (0.0, [])

    async def snapshot(self) -> dict[str, Any]:
        texts = await asyncio.gather(*(self._scrape(a) for a in await self._node_addresses()))
        return summarize(parse_samples("\n".join(texts), self.app_name))

    async def _node_addresses(self) -> list[str]:
        fetched_at, addresses = self._known
        if time.monotonic() - fetched_at > NODES_TTL_S or not addresses:
            self._known = (time.monotonic(), await self._addresses())
        return self._known[1]

    async def _scrape(self, address: str) -> str:
        try:
            response = await self.client.get(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S)
            return response.text if response.status_code == 200 else ""
        except httpx.HTTPError:
            return ""  # a node going away: its numbers are missing from this view, nothing fails


def parse_samples(text: str, app_name: str) -> list[tuple[str, dict[str, str], float]]:
    """(name without Ray's prefix, labels, value) of this application's grounded_serve samples."""
    samples = []
    wanted = RAY_PREFIX + telemetry.PREFIX
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(wanted):
            continue
        for sample in family.samples:
            if sample.labels.get("application", app_name) == app_name:
                samples.append((sample.name[len(RAY_PREFIX):], dict(sample.labels), float(sample.value)))
    return samples


def summarize(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    events: collections.Counter[str] = collections.Counter()
    buckets: dict[str, collections.Counter[float]] = collections.defaultdict(collections.Counter)
    sums: collections.Counter[tuple[str, str]] = collections.Counter()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    replicas: dict[str, dict[str, float]] = collections.defaultdict(dict)
    lookups: collections.Counter[str] = collections.Counter()
    for name, labels, value in samples:
        replica = labels.get("replica", "")
        if name == telemetry.EVENTS + "_total":
            events[labels.get("event", "")] += value
        elif name == telemetry.BATCH_SIZE + "_bucket":
            buckets[labels.get("deployment", "")][float(labels["le"])] += value
        elif name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in (
                telemetry.REQUEST_SECONDS, telemetry.STAGE_SECONDS, telemetry.QUEUE_WAIT):
            base, kind = name.rsplit("_", 1)
            key = (base, labels.get("route") or labels.get("stage") or labels.get("deployment", ""))
            (sums if kind == "sum" else counts)[key] += value
        elif name == telemetry.CACHE_LOOKUPS + "_total":
            result = labels.get("result", "")
            lookups[result] += value
            key = {"hit": "hits", "miss": "misses"}.get(result, result)
            replicas[replica][key] = replicas[replica].get(key, 0) + value
        elif name == telemetry.IMAGES_ENCODED + "_total":
            replicas[replica]["images_encoded"] = value
        elif name in (telemetry.CACHE_ENTRIES, telemetry.CACHE_BYTES):
            replicas[replica]["entries" if name == telemetry.CACHE_ENTRIES else "bytes"] = value
    return {
        "counters": {event: int(n) for event, n in sorted(events.items())},
        "batch_sizes": {deployment: _batch_histogram(cumulative) for deployment, cumulative in buckets.items()},
        "seconds": {f"{base.removeprefix(telemetry.PREFIX)}:{key}": {"count": int(counts[(base, key)]),
                                                                   "mean_s": sums[(base, key)] / counts[(base, key)]}
                    for base, key in sorted(counts) if counts[(base, key)]},
        "sam_embedding_cache": {"hits": int(lookups["hit"]), "misses": int(lookups["miss"]),
                                "replicas": {replica: {k: int(v) for k, v in stats.items()}
                                             for replica, stats in replicas.items()}},
    }


def _batch_histogram(cumulative: collections.Counter[float]) -> dict[str, Any]:
    """Batches per size from cumulative `le` buckets. Sizes up to 16 are exact; above, a bucket is named by
    its upper bound."""
    batches: dict[int, int] = {}
    below = 0.0
    for bound in sorted(b for b in cumulative if b != float("inf")):
        if cumulative[bound] > below:
            batches[int(bound)] = int(cumulative[bound] - below)
        below = max(below, cumulative[bound])
    total = sum(batches.values())
    items = sum(size * n for size, n in batches.items())
    return {
        "batches_by_size": {str(size): n for size, n in batches.items()},
        "items_by_batch_size": {str(size): size * n for size, n in batches.items()},
        "batches": total,
        "max": max(batches, default=0),
        "mean": items / total if total else 0.0,
    }
