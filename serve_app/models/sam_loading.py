"""Loading SAM checkpoints strictly into the architecture they were made for.

The model type (serve_app.models.sam_builders) comes from `SAM_MODEL_TYPE` or is inferred from the
checkpoint's keys and shapes; MobileSAM checkpoints are renamed to timm's TinyViT on the way in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from serve_app import get_logger
from serve_app.models.errors import CheckpointError
from serve_app.models.mobile_sam import remap_mobile_sam_keys
from serve_app.models.sam_builders import build_sam

logger = get_logger(__name__)

# Width of the image encoder's patch embedding identifies the ViT size.
_VIT_TYPE_BY_EMBED_DIM = {1280: "vit_h", 1024: "vit_l", 768: "vit_b", 64: "tiny"}
_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SAM checkpoint {str(path)!r} does not exist or is not a file")
    try:
        # weights_only: a checkpoint is data; never run code from a pickle
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for corrupt files
        first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{path} is not a readable PyTorch state dict ({first_line})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints wrap the weights
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def infer_model_type(state_dict: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "vit_t"  # TinyViT stages are named layers.N; SAM's ViT uses blocks.N
    weight = state_dict.get(_PATCH_EMBED_KEY)
    if weight is None:
        raise CheckpointError(f"cannot tell the SAM type: {_PATCH_EMBED_KEY} is missing")
    model_type = _VIT_TYPE_BY_EMBED_DIM.get(int(weight.shape[0]))
    if model_type is None:
        raise CheckpointError(f"cannot tell the SAM type from an image encoder width of {weight.shape[0]}")
    return model_type


def load_sam(checkpoint: str | Path, model_type: str = "auto"):
    """Build the architecture and load the checkpoint strictly; returns the model in eval mode."""
    state = read_state_dict(checkpoint)
    inferred = infer_model_type(state)
    model_type = (model_type or "auto").lower()
    if model_type == "auto":
        model_type = inferred
    elif model_type != inferred:
        raise CheckpointError(
            f"SAM_MODEL_TYPE is {model_type!r} but {checkpoint} looks like a {inferred!r} checkpoint"
        )
    sam = build_sam(model_type)
    origin: dict[str, str] = {}
    if model_type == "vit_t":
        state, origin = remap_mobile_sam_keys(state)
    try:
        missing, unexpected = sam.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{checkpoint} does not fit SAM {model_type}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint} does not fit SAM {model_type}: missing keys {sorted(missing)[:10]}, "
            f"unexpected keys {sorted(origin.get(k, k) for k in unexpected)[:10]}"
        )
    logger.info("loaded SAM %s from %s", model_type, checkpoint)
    # eval() after loading: TinyViT caches gathered attention biases when switched to eval mode
    return sam.eval(), model_type
