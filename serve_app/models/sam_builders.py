"""SAM architectures by model type, with random weights: a table of builders, as segment-anything's build_sam.

`vit_h`, `vit_l`, `vit_b`: segment-anything's own; `vit_t`: MobileSAM (timm's TinyViT encoder,
serve_app.models.mobile_sam); `tiny`: a small SAM of this project for offline demos and tests (the same
classes, fewer and narrower layers). Every one is segment-anything's `Sam` around its image encoder.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from serve_app.models.errors import CheckpointError


def assemble_sam(image_encoder, *, img_size: int, prompt_dim: int, decoder_mlp_dim: int, decoder_heads: int,
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
    return assemble_sam(encoder, img_size=img_size, prompt_dim=prompt_dim, decoder_mlp_dim=64, decoder_heads=2,
                        iou_hidden_dim=32)


def build_mobile_sam():
    """MobileSAM: TinyViT-5M encoder + SAM's prompt encoder and mask decoder at vit_b sizes."""
    from serve_app.models.mobile_sam import IMG_SIZE, TinyVitEncoder

    return assemble_sam(TinyVitEncoder(), img_size=IMG_SIZE, prompt_dim=256, decoder_mlp_dim=2048, decoder_heads=8,
                        iou_hidden_dim=256)


def _segment_anything(model_type: str):
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)


SAM_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "vit_h": partial(_segment_anything, "vit_h"),
    "vit_l": partial(_segment_anything, "vit_l"),
    "vit_b": partial(_segment_anything, "vit_b"),
    "vit_t": build_mobile_sam,
    "tiny": build_tiny_sam,
}
SAM_TYPES = tuple(SAM_BUILDERS)


def build_sam(model_type: str):
    """A SAM of the given type with random weights (a checkpoint is loaded into it afterwards)."""
    builder = SAM_BUILDERS.get(model_type)
    if builder is None:
        raise CheckpointError(f"unknown SAM model type {model_type!r}; expected one of {', '.join(SAM_TYPES)}")
    return builder()
