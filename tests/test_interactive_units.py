"""Click labels, the embedding cache, and image-affinity routing, without Ray."""

import pytest
import torch

from serve_app.deployments.routing import rendezvous_order
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.interactive import click_label
from serve_app.ingress.label_config import parse_label_config
from serve_app.models.embedding_cache import CachedEmbedding, EmbeddingCache
from tests.configs import CLICK_CONFIG


def test_click_labels_must_exist_on_the_mask_tag():
    config = parse_label_config(CLICK_CONFIG)
    assert click_label(config, "cats") == "cats" and click_label(config, "CATS") == "cats"
    with pytest.raises(BadRequest, match="not a label of the mask tag"):
        click_label(config, "dog")


def test_cache_is_lru_and_bounded_in_bytes():
    def entry(value):
        return CachedEmbedding(torch.full((1, 4, 8, 8), float(value)), (8, 8))  # 1 KiB each

    cache = EmbeddingCache(max_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, entry(1))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry(2))  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd")
    assert cache.get("b") is None
    assert cache.stats() == {"entries": 3, "bytes": 3 * 1024, "max_bytes": 3 * 1024, "hits": 1, "misses": 1,
                             "evictions": 1}
    EmbeddingCache(0).put("x", entry(1))  # a zero budget caches nothing
    assert "x" not in EmbeddingCache(0)


def test_rendezvous_routing_is_stable_and_moves_little_when_replicas_change():
    replicas = ["r1", "r2", "r3"]
    keys = [f"image-{i}" for i in range(300)]
    first = {k: replicas[rendezvous_order(k, replicas)[0]] for k in keys}
    assert first == {k: replicas[rendezvous_order(k, replicas)[0]] for k in keys}  # every caller agrees
    assert set(first.values()) == set(replicas)  # spread over all replicas
    grown = replicas + ["r4"]
    moved = [k for k in keys if grown[rendezvous_order(k, grown)[0]] != first[k]]
    assert all(grown[rendezvous_order(k, grown)[0]] == "r4" for k in moved)  # only to the new replica
    assert len(moved) < len(keys) / 2
