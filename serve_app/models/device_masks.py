"""SAM's masks finished where the model runs: SAM's own up-sampling, the threshold, and where each mask's runs start.

On a GPU replica, what followed the mask decoder ran on the replica's one CPU thread: copy the logits to the host,
up-sample them, scan every pixel for RLE (with the resize, 67 ms an image for 20 masks at 640×480 on the
development VM's core, 1.4 s for a 12-megapixel photo: benchmarks.segmenter_pixels). Here the GPU does all of it
and only the run starts cross to the host: a few KB a mask for a trained model, where its pixels are 300 KB.
The up-sampling is `Sam.postprocess_masks` itself, so masks equal `SamPredictor`'s on the same device.

A batch's masks stay on the device until `to_host` copies them all after one wait, so the CPU queues the next
image's kernels while the GPU runs the last one's instead of draining the GPU once per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from serve_app.masks.encode import POLYGONS, RLE
from serve_app.masks.rle import MaskRuns
from serve_app.models.messages import Masks, SegmentationRequest

# floats of up-sampled logits held at once (256 MB): a chunk of masks at a time, however large the image
_CHUNK_FLOATS = 1 << 26
# mask pixels a batch keeps on the device before copying them to the host (a byte each, twice while their runs are
# found): 20 masks of 8 images at 640×480 go in one copy; 12-megapixel photos a few masks at a time
HOST_COPY_PIXELS = 1 << 27


@dataclass
class DeviceMasks:
    """One request's masks, still on the device."""
    masks: torch.Tensor  # (N, H, W) bool
    scores: torch.Tensor  # (N,) predicted IoU
    as_runs: bool  # only RLE is wanted: copy the run starts, not the pixels


def wants_runs(request: SegmentationRequest) -> bool:
    """Whether the request's masks may come to the host as run starts: RLE is all it asked for."""
    return RLE in request.encodings and POLYGONS not in request.encodings


class HostCopies:
    """A batch's answers into `results` by request index: those on the host as they come, those still on the device
    together (`to_host`), whenever HOST_COPY_PIXELS of their mask pixels wait, and at `finish`."""

    def __init__(self, results: list[Masks]):
        self.results = results
        self.waiting: list[tuple[int, DeviceMasks]] = []

    def put(self, index: int, masks: Masks | DeviceMasks) -> None:
        if isinstance(masks, Masks):
            self.results[index] = masks
            return
        self.waiting.append((index, masks))
        if sum(pending.masks.numel() for _, pending in self.waiting) >= HOST_COPY_PIXELS:
            self.finish()

    def finish(self) -> None:
        for (index, _), masks in zip(self.waiting, to_host([pending for _, pending in self.waiting])):
            self.results[index] = masks
        self.waiting.clear()


def decode_each(requests: list[SegmentationRequest], active: list[int], entries: list, encoded_now: set[int],
                decode: Callable[[SegmentationRequest, Any], Masks | DeviceMasks]) -> list[Masks]:
    """Every segmenter's last step: each active request's masks (`decode(request, its cache entry)`), those made on
    the device brought to the host together, and each marked a cache hit unless its image was encoded now."""
    results = [Masks(masks=np.zeros((0, *r.image.shape[:2]), bool)) for r in requests]
    copies = HostCopies(results)
    for i, entry in zip(active, entries):
        copies.put(i, decode(requests[i], entry))
    copies.finish()
    for n, i in enumerate(active):
        results[i].cache_hit = n not in encoded_now
    return results


def upsample_on_device(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                       encoder_size: int = 1024, threshold: float = 0.0) -> torch.Tensor:
    """(N, h, w) low-resolution logits -> (N, H, W) bool masks on their device, as
    `Sam.postprocess_masks(...) > threshold`."""
    height, width = int(original_size[0]), int(original_size[1])
    masks = torch.empty((low_res.shape[0], height, width), dtype=torch.bool, device=low_res.device)
    chunk = max(1, _CHUNK_FLOATS // (encoder_size * encoder_size + height * width))
    for start in range(0, low_res.shape[0], chunk):
        logits = low_res[start:start + chunk, None].float()
        logits = F.interpolate(logits, (encoder_size, encoder_size), mode="bilinear", align_corners=False)
        logits = logits[..., :input_size[0], :input_size[1]]
        logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        masks[start:start + chunk] = logits[:, 0] > threshold
    return masks


def runs_on_device(masks: torch.Tensor) -> list[MaskRuns]:
    """Each (H, W) bool mask of an (N, H, W) stack as its run starts, found on the masks' device."""
    return to_host([DeviceMasks(masks, torch.zeros(masks.shape[0], device=masks.device), True)])[0].runs


def to_host(pending: list[DeviceMasks]) -> list[Masks]:
    """Every request's masks on the host, copied after one wait for the device: as run starts where only RLE is
    wanted, else as pixels."""
    if not pending:
        return []
    runs = iter(_runs([p.masks for p in pending if p.as_runs]))  # its nonzero is the wait for the device
    scores = torch.cat([p.scores.float().reshape(-1) for p in pending]).cpu().numpy()
    results, first_score = [], 0
    for p in pending:
        count = p.masks.shape[0]
        mine = scores[first_score:first_score + count]
        first_score += count
        if p.as_runs:
            results.append(Masks(masks=np.zeros((count, 0, 0), bool), scores=mine,
                                 runs=[next(runs) for _ in range(count)]))
        else:
            results.append(Masks(masks=p.masks.cpu().numpy(), scores=mine))
    return results


def _runs(stacks: list[torch.Tensor]) -> list[MaskRuns]:
    """Run starts of every mask of every (N, H, W) stack, in order. All masks are laid end to end in one flat
    vector, so one `nonzero` (and one copy) finds every flip; flips across a boundary between masks are dropped."""
    sizes = [int(stack.shape[1] * stack.shape[2]) for stack in stacks for _ in range(stack.shape[0])]
    if not sizes:
        return []
    flat = torch.cat([stack.reshape(-1) for stack in stacks])
    starts = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    if flat.numel() == 0:
        return [MaskRuns(np.zeros(0, np.int64), False, size) for size in sizes]
    nonempty = [n for n, size in enumerate(sizes) if size]
    firsts = flat[torch.as_tensor(starts[nonempty], device=flat.device)]  # queued before nonzero's wait
    flips = (flat[1:] != flat[:-1]).nonzero().view(-1)  # a flip between pixel g and g + 1; waits for the device
    flips = (flips.to(torch.int32) if flat.numel() < 2**31 else flips).cpu().numpy().astype(np.int64)
    first_values = np.zeros(len(sizes), bool)
    first_values[nonempty] = firsts.cpu().numpy()
    lows = np.searchsorted(flips, starts[:-1])  # a mask's own flips: g in [start, end - 1)
    highs = np.searchsorted(flips, np.maximum(starts[1:] - 1, starts[:-1]))
    index_type = np.int32 if max(sizes) < 2**31 else np.int64
    return [MaskRuns((flips[lows[n]:highs[n]] - starts[n] + 1).astype(index_type), bool(first_values[n]), size)
            for n, size in enumerate(sizes)]
