"""The shared fixture's deterministic MobileSAM weights (recipe in ../shared/fixtures/mobile_sam/README.md)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from tests.conftest import SHARED

_FIXTURE = SHARED / "fixtures" / "mobile_sam" / "vit_t_state_dict_shapes.json"
# Without ../shared (benchmarks/gpu.sh on a fresh GPU machine) the keys and shapes kept in benchmarks/.
LAYOUT = json.loads((_FIXTURE if _FIXTURE.exists() else
                     Path(__file__).resolve().parents[1] / "benchmarks" / "mobile_sam_layout.json").read_text())


def synthetic_state_dict(entries) -> dict[str, torch.Tensor]:
    """Every tensor seeded by the crc32 of its key, by the fixture README's rules."""
    state = {}
    for key, shape, *_ in entries:
        torch.manual_seed(zlib.crc32(key.encode("utf-8")))
        if key.endswith("num_batches_tracked"):
            tensor = torch.zeros(shape, dtype=torch.int64)
        elif key.endswith("running_var"):
            tensor = 1.0 + 0.1 * torch.rand(shape)
        elif key.endswith(".weight") and len(shape) == 1:
            tensor = 1.0 + 0.02 * torch.randn(shape)
        elif key.endswith("positional_encoding_gaussian_matrix"):
            tensor = torch.randn(shape)
        else:
            tensor = 0.02 * torch.randn(shape)
        state[key] = tensor
    return state


def save_mobile_sam_checkpoint(path: Path) -> Path:
    """A file with the official mobile_sam.pt layout and the fixture's synthetic weights."""
    torch.save(synthetic_state_dict(LAYOUT["entries"]), path)
    return path
