"""An LRU cache of SAM image embeddings, bounded in bytes.

The image encoder is the expensive part of SAM (seconds on CPU, tens of ms on GPU); the decoder is
cheap. Caching embeddings by image content makes every click after the first on an image skip the
encoder. Keys are content hashes, so the same image reached by two URLs is one entry.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class CachedEmbedding:
    # segment-anything: a 1 x C x h x w tensor; transformers families: the keyword arguments their decoder
    # reads (SAM 2's feature pyramid, SAM-HQ's intermediate ViT features), on the model's device
    embedding: Any
    input_size: tuple[int, int]  # the resized image's size before padding
    encoder_size: int = 1024  # the encoder input's side

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.embedding)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def own_row(batch: torch.Tensor, row: int) -> torch.Tensor:
    """One row of a batch as a float32 copy to cache, not a view: a cached view would keep the whole batch's tensor
    alive behind one entry's bytes."""
    return batch[row:row + 1].to(torch.float32, copy=True)


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[str, CachedEmbedding] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> CachedEmbedding | None:
        with self._lock:
            entry = self._entries.get(key) if key else None
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CachedEmbedding) -> None:
        if not key or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key).nbytes
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1

    def lookup_or_encode(self, images: list, keys: list[str],
                         encode: Callable[[list], list[CachedEmbedding]]) -> tuple[list[CachedEmbedding], set[int]]:
        """Each item's entry: from the cache, or from one `encode` call over the distinct uncached images (an
        image sent twice in one batch is encoded once); and the indices of the items encoded now. Items without
        a key are encoded and not cached."""
        entries: dict[int, CachedEmbedding] = {}
        to_encode: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            cached = self.get(key) if key else None
            if cached is not None:
                entries[i] = cached
            else:
                to_encode.setdefault(key or f"uncached-{i}", []).append(i)
        groups = list(to_encode.values())
        if groups:
            for group, entry in zip(groups, encode([images[group[0]] for group in groups])):
                self.put(keys[group[0]], entry)
                for i in group:
                    entries[i] = entry
        return [entries[i] for i in range(len(keys))], {i for group in groups for i in group}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
