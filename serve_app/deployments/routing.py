"""Replica affinity for SAM embeddings without splitting batches, on Ray Serve's public router API.

Clicks on one image should reach the segmenter replica that already holds its embedding. Serve's
model multiplexing would route them, but it would also split the encoder's batches by image. This router
ranks replicas by rendezvous hashing of the request's `image_key`: every caller picks the same replica for
an image while the replica set is stable, a new replica only takes over its share of images, and a replica
still batches every image routed to it. When the preferred replica is full, Serve falls through to the
next rank (a cache miss there, never a failure). Requests without a key use a random order.

`FIFOMixin` hands each chosen replica to the oldest pending request. Ray's default matching looks requests
up by their internal request id, which every handle call made while serving one HTTP request shares, so
without the mixin the concurrent segment calls of one /predict were never all matched (they hung). The
price: in a burst, a replica chosen for one image may go to an older pending request for another image
(a cache miss on that replica, never a wrong answer); tests/test_affinity.py bounds that miss rate.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


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


class ImageAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = image_key_of(pending_request)
        if not key or len(candidate_replicas) < 2:
            shuffled = list(candidate_replicas)
            random.shuffle(shuffled)
            return [shuffled]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        return [[candidate_replicas[i]] for i in order]
