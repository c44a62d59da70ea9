"""Building SAM models and loading their checkpoints strictly.

Model types: segment-anything's `vit_h`, `vit_l`, `vit_b`; MobileSAM's `vit_t`; and `tiny`, a
small SAM of this project for offline demos and tests (same classes, fewer and narrower layers).
The type comes from `SAM_MODEL_TYPE` or is inferred from the checkpoint's keys and shapes.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SAM_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t", "tiny")
# Width of the image encoder's patch embedding identifies the ViT size.
_VIT_TYPE_BY_EMBED_DIM = {1280: "vit_h", 1024: "vit_l", 768: "vit_b", 64: "tiny"}
_PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested or inferable architecture."""


def assemble_sam(image_encoder, img_size: int, prompt_dim: int, decoder_mlp_dim: int, decoder_heads: int,
                 iou_hidden_dim: int):
    """segment-anything's Sam around any image encoder, with SAM's prompt encoder, decoder and normalisation."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = img_size // 16  # every SAM encoder downsamples by 16
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=decoder_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def build_tiny_sam(img_size: int = 256):
    """A ~0.2M-parameter SAM with the real module classes, for tests and offline demos."""
    from segment_anything.modeling import ImageEncoderViT

    embed_dim, depth, prompt_dim = 64, 2, 32
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=(depth - 1,), window_size=4, out_chans=prompt_dim,
    )
    return assemble_sam(encoder, img_size, prompt_dim, decoder_mlp_dim=64, decoder_heads=2, iou_hidden_dim=32)


def build_sam(model_type: str):
    """An un-initialised-from-checkpoint SAM of the given type."""
    if model_type == "tiny":
        return build_tiny_sam()
    if model_type == "vit_t":
        from serve_app.models.mobile_sam import build_mobile_sam

        return build_mobile_sam()
    if model_type not in ("vit_h", "vit_l", "vit_b"):
        raise CheckpointError(f"unknown SAM model type {model_type!r}; expected one of {', '.join(SAM_TYPES)}")
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)


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
        from serve_app.models.mobile_sam import remap_mobile_sam_keys

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
