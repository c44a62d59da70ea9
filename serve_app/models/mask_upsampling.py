"""SAM's mask post-processing, computed only where a mask can be positive.

`Sam.postprocess_masks` up-samples every low-resolution logit map (256²) bilinearly to the encoder's input
(1024²), crops the padding, and up-samples again to the original image size; a pixel is in the mask when its
logit is above `mask_threshold`. Both resizes are linear and separable per axis, so their composition is one
matrix per axis, A (H × 256) and B (W × 256), and the full-resolution logits are A @ L @ Bᵀ.

Every row of A and B holds non-negative weights summing to 1 (a bilinear resize is a convex combination of
neighbours, and so is a composition of two), so a full-resolution logit is above the threshold only where some
low-resolution logit in its support is. The pixels outside the window of rows and columns whose support meets
the positive low-resolution logits are therefore exactly background, and only the window is computed: the cost
follows the mask's area, not the image's, and no 1024² intermediate is made. Inside the window the sums run in
float64, so the masks equal `SamPredictor`'s except where a logit is within float32 rounding of the threshold.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)  # an entry is out x 256 float64: 8 MB for a 4000 px side
def _axis_map(low: int, encoder: int, valid: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """The composed 1-D map of one axis: low -> encoder (bilinear), crop to `valid`, -> out (bilinear), as an
    (out × low) float64 matrix, and per output index the first and last low index it reads."""
    def resize(n_in: int, n_out: int) -> torch.Tensor:
        # torch's own float32 bilinear weights, read off by resizing the identity along one axis
        eye = torch.eye(n_in, dtype=torch.float32)[None, None]  # (1, 1, n_in, n_in): rows are inputs
        return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0].double()

    composed = resize(valid, out) @ resize(low, encoder)[:valid]  # rows sum to 1
    nonzero = composed > 0
    first = nonzero.to(torch.uint8).argmax(dim=1)
    last = low - 1 - nonzero.flip(1).to(torch.uint8).argmax(dim=1)
    return composed.numpy(), torch.stack([first, last], dim=1).numpy()


def _window(support: np.ndarray, low_min: int, low_max: int) -> tuple[int, int]:
    """Output indices [start, stop) whose support [first, last] meets [low_min, low_max] (both bounds are
    non-decreasing in the output index, as a resize's support is)."""
    start = int(np.searchsorted(support[:, 1], low_min, side="left"))
    stop = int(np.searchsorted(support[:, 0], low_max, side="right"))
    return start, max(start, stop)


def upsample_masks(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                   encoder_size: int = 1024, threshold: float = 0.0, windowed_up_to: float = 0.25) -> np.ndarray:
    """(N, h, w) low-resolution logits -> (N, H, W) boolean masks, as `Sam.postprocess_masks(...) > threshold`.

    Masks whose window covers at most `windowed_up_to` of the image are computed in their window; larger ones
    (noise, or an object filling the picture) through SAM's own two resizes, which are cheaper there."""
    count = low_res.shape[0]
    height, width = int(original_size[0]), int(original_size[1])
    rows, row_support = _axis_map(low_res.shape[1], encoder_size, int(input_size[0]), height)
    cols, col_support = _axis_map(low_res.shape[2], encoder_size, int(input_size[1]), width)
    masks = np.zeros((count, height, width), bool)
    low = low_res.detach().to("cpu", torch.float64).numpy()
    positive = low > threshold
    whole = []
    for n in range(count):
        low_rows = np.flatnonzero(positive[n].any(axis=1))
        if not len(low_rows):
            continue  # no positive logit: every pixel is background
        low_cols = np.flatnonzero(positive[n].any(axis=0))
        y0, y1 = _window(row_support, low_rows[0], low_rows[-1])
        x0, x1 = _window(col_support, low_cols[0], low_cols[-1])
        if (y1 - y0) * (x1 - x0) > windowed_up_to * height * width:
            whole.append(n)
            continue
        if y0 == y1 or x0 == x1:
            continue
        r0, r1 = int(row_support[y0, 0]), int(row_support[y1 - 1, 1]) + 1  # every low row the window reads
        c0, c1 = int(col_support[x0, 0]), int(col_support[x1 - 1, 1]) + 1
        window = rows[y0:y1, r0:r1] @ low[n, r0:r1, c0:c1] @ cols[x0:x1, c0:c1].T  # small: numpy, one thread
        masks[n, y0:y1, x0:x1] = window > threshold
    for start in range(0, len(whole), 8):  # bounds the float intermediates held at once
        chosen = whole[start:start + 8]
        full = F.interpolate(low_res[chosen, None].float(), (encoder_size, encoder_size), mode="bilinear",
                             align_corners=False)[..., :input_size[0], :input_size[1]]
        full = F.interpolate(full, (height, width), mode="bilinear", align_corners=False)
        masks[chosen] = (full[:, 0] > threshold).cpu().numpy()
    return masks
