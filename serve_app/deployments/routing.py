"""Replica affinity for SAM embeddings without splitting batches.

Clicks on one image should reach the segmenter replica that already holds its embedding. Serve's
model multiplexing would route them, but `@serve.batch` splits batches by multiplexed model id, so the
encoder would stop batching across images. This router instead ranks replicas by rendezvous hashing of
the request's `image_key`: every caller picks the same replica for an image while the replica set is
stable, a new replica only takes over its share of images, and a replica still batches every image
routed to it. When the preferred replica is full, Serve falls through to the next rank (a cache miss
there, never a failure). Requests without a key use a random order.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def image_key_of(pending_request: PendingRequest | None) -> str:
    if pending_request is None:
        return ""
    for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
        key = getattr(arg, "image_key", "")
        if isinstance(key, str) and key:
            return key
    return ""


def rendezvous_order(key: str, replica_ids: list[str]) -> list[int]:
    """Indices of `replica_ids`, best first, by highest hash(key, replica)."""
    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest()

    return sorted(range(len(replica_ids)), key=lambda i: weight(replica_ids[i]), reverse=True)


class ImageAffinityRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = image_key_of(pending_request)
        if not key or len(candidate_replicas) < 2:
            shuffled = list(candidate_replicas)
            random.shuffle(shuffled)
            return [shuffled]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        return [[candidate_replicas[i]] for i in order]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        # Ray 2.60's base router finds the request by `internal_request_id`, but every handle call made
        # while serving one HTTP request inherits that request's id: of several concurrent segment calls
        # from one /predict only one was ever matched, and the rest waited forever. The routing task
        # passes the very metadata object of the request it chose for, so match on identity instead.
        for pending in self._pending_requests_to_fulfill:
            if pending.metadata is request_metadata and not pending.future.done():
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                if self._pending_requests_by_id.get(request_metadata.internal_request_id) is pending:
                    self._pending_requests_by_id.pop(request_metadata.internal_request_id)
                return
        super()._fulfill_next_pending_request(replica, request_metadata)
