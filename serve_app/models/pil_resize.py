"""Pillow's bilinear resize of 8-bit images, bit for bit, on any torch device.

segment-anything resizes every image with Pillow (`ResizeLongestSide.apply_image`: torchvision's `resize` on a PIL
image, bilinear). On a GPU replica that ran on its one CPU thread: 7 ms on the development VM's core for a 640×480
image, 56 ms for a 12-megapixel photo (benchmarks.segmenter_pixels). This computes the same bytes where the model
runs, so only the original image crosses to the GPU and SAM's masks stay what `SamPredictor` gives.

Pillow's algorithm (libImaging/Resample.c): per axis, each output pixel is a weighted sum of a window of input
pixels, the triangle filter widened by the scale when shrinking (which is what anti-aliases), the weights
normalised, then rounded to 22-bit fixed point. One pass rounds to 8 bits and the other reads that: horizontal
first, except where the installed Pillow's version runs the vertical one first (`_vertical_first`). Integer sums
make it exact on any device; the weights are computed here in float64, in Pillow's order of operations.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


@functools.lru_cache(maxsize=32)
def axis_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for bilinear: per output index, the input indices
    it reads and their fixed-point weights, each (out_size × taps) int64 (unused taps: index 0, weight 0)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 1.0 * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    offsets = np.arange(taps)
    used = offsets[None, :] < count[:, None]
    inverse = 1.0 / filter_scale  # Pillow multiplies by the reciprocal: the same rounding
    weights = np.where(used, _triangle(((first[:, None] + offsets[None, :]) - center[:, None] + 0.5) * inverse), 0.0)
    total = np.zeros(out_size)
    for tap in range(taps):  # summed in Pillow's order: float addition is not associative
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0.0)
    scaled = weights * (1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    index = np.where(used, first[:, None] + offsets[None, :], 0)
    return index, fixed


@functools.lru_cache(maxsize=32)
def _on_device(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`axis_coefficients` on `device`, kept there: a replica sees few distinct image sizes."""
    index, fixed = axis_coefficients(in_size, out_size)
    return torch.as_tensor(index, device=device), torch.as_tensor(fixed.astype(np.int32), device=device)


def _resample(image: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One pass along `axis` (0: rows, 1: columns) of an (H, W, C) uint8 image. The sums fit int32: the weights
    are non-negative and add up to about 2^22, so a sum stays below 255 × 2^22 + 2^21 + 255 × taps."""
    index, fixed = _on_device(image.shape[axis], out_size, image.device)
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    total = torch.full((), 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for tap in range(index.shape[1]):  # one tap at a time: memory stays at two output-sized images
        total = total + image.index_select(axis, index[:, tap]).to(torch.int32) * fixed[:, tap].view(shape)
    return (total >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize_like_pil(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An (H, W, C) uint8 image resized to `size` (height, width) as `PIL.Image.resize(..., BILINEAR)` does it,
    on the image's device; uint8 out."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {tuple(image.shape)} {image.dtype}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}×{width}")
    out = image
    passes = [(1, width), (0, height)]
    if _vertical_first(image.shape[0], image.shape[1], height, width):
        passes.reverse()
    for axis, size_out in passes:
        if size_out != out.shape[axis]:
            out = _resample(out, axis, size_out)
    return out if out is not image else image.clone()


def _vertical_first(height: int, width: int, height_out: int, width_out: int) -> bool:
    """Which pass Pillow runs first; the order changes the 8-bit rounding between them, so this follows the Pillow
    installed beside segment-anything. Pillow 13 (Resample.c, `horizontal_first`): vertical first when the height
    shrinks by more than twice as many pixels as the width; 12.2 and 12.3 (Image.resize): when the image is over
    100 times taller than wide and its height shrinks; before 12.2: always horizontal first."""
    version = _pillow_version()
    shrink = height - height_out
    if version >= (13, 0):
        return shrink > 0 and shrink > (width - width_out) * 2
    if version >= (12, 2):
        return shrink > 0 and height > width * 100
    return False


@functools.lru_cache(maxsize=1)
def _pillow_version() -> tuple[int, int]:
    import PIL

    major, minor = PIL.__version__.split(".")[:2]
    return int(major), int(minor)
