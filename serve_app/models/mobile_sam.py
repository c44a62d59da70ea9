"""MobileSAM (vit_t): a TinyViT-5M image encoder from timm, with SAM's own prompt encoder and decoder.

MobileSAM's encoder is TinyViT-5M with two changes: the last patch merging keeps the 64x64 grid
(stride 1) and a SAM-style neck maps 320 channels to 256. timm's `TinyVit` has the same blocks
and parameter names up to a mechanical renaming, so the official `mobile_sam.pt` loads into it
after `remap_mobile_sam_keys`. Everything after the encoder is segment-anything's `Sam` (serve_app.models.sam_builders).
"""

from __future__ import annotations

import re

import torch
from torch import nn

IMG_SIZE = 1024
# The ImageNet classifier of TinyViT ships in mobile_sam.pt but SAM never uses it.
UNUSED_KEYS = ("norm_head.weight", "norm_head.bias", "head.weight", "head.bias")
_ENCODER_PREFIX = "image_encoder."
# (MobileSAM name, timm wrapper name); the first matching rule applies.
_RENAMES = (
    (re.compile(r"^patch_embed\.seq\.0\."), "trunk.patch_embed.conv1."),
    (re.compile(r"^patch_embed\.seq\.2\."), "trunk.patch_embed.conv2."),
    # MobileSAM downsamples at the end of a stage, timm at the start of the next one.
    (re.compile(r"^layers\.(\d)\.downsample\."), lambda m: f"trunk.stages.{int(m.group(1)) + 1}.downsample."),
    (re.compile(r"^layers\.(\d)\.blocks\."), lambda m: f"trunk.stages.{m.group(1)}.blocks."),
    (re.compile(r"^neck\."), "neck."),
)


class TinyVitEncoder(nn.Module):
    """MobileSAM's image encoder: B x 3 x 1024 x 1024 -> B x 256 x 64 x 64."""

    img_size = IMG_SIZE  # read by Sam.preprocess / postprocess_masks and SamPredictor

    def __init__(self):
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d
        from timm.models.tiny_vit import TinyVit

        self.trunk = TinyVit(
            num_classes=0, global_pool="", embed_dims=(64, 128, 160, 320), depths=(2, 2, 6, 2),
            num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), drop_path_rate=0.0,
        )
        self.trunk.head = nn.Identity()
        self.trunk.stages[3].downsample.conv2.conv.stride = (1, 1)  # keep 64 x 64 for SAM's decoder
        self.neck = nn.Sequential(
            nn.Conv2d(320, 256, kernel_size=1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk.forward_features(x))


def remap_mobile_sam_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """MobileSAM checkpoint keys -> this model's keys. Returns the new dict and new-name -> original-name.

    Drops exactly the four unused classifier keys; a key no rule covers is kept as is, so a strict
    load names it as unexpected.
    """
    remapped, origin = {}, {}
    for key, tensor in state_dict.items():
        new_key = key
        if key.startswith(_ENCODER_PREFIX):
            local = key[len(_ENCODER_PREFIX):]
            if local in UNUSED_KEYS:
                continue
            for pattern, replacement in _RENAMES:
                if pattern.match(local):
                    local = pattern.sub(replacement, local, count=1)
                    break
            new_key = _ENCODER_PREFIX + local.replace(".c.weight", ".conv.weight")
        remapped[new_key] = tensor
        origin[new_key] = key
    return remapped, origin
