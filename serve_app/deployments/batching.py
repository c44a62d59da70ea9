"""Shared batch settings for the model deployments, driven by `user_config` in the Serve config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.0  # take what queued while the last batch ran; see docs/performance.md


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    torch_threads: int = 0  # 0 keeps Ray's default (OMP_NUM_THREADS=1 in replicas)

    @classmethod
    def from_user_config(cls, user_config: Mapping[str, Any] | None) -> "BatchConfig":
        config = dict(user_config or {})
        unknown = set(config) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown user_config key(s): {', '.join(sorted(unknown))}")
        parsed = cls(
            max_batch_size=int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            batch_wait_timeout_s=float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S)),
            torch_threads=int(config.get("torch_threads", 0)),
        )
        if parsed.max_batch_size < 1 or parsed.batch_wait_timeout_s < 0 or parsed.torch_threads < 0:
            raise ValueError(f"invalid batch settings: {parsed}")
        return parsed


def apply_batch_config(batched_method, config: BatchConfig) -> None:
    """Resize a `@serve.batch` method's queue at run time."""
    batched_method.set_max_batch_size(config.max_batch_size)
    batched_method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
