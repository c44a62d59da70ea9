"""Clicks and boxes through a transformers SAM-style decoder, the same for every family that has one (SAM 2 / 2.1,
SAM-HQ, EdgeTAM, SAM, SAM 3's tracker): coordinates scaled to the encoder's input as the processors scale them,
one mask per box in chunks, or one mask from all clicks and the first box, the best of three for a lone click."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from serve_app.models.device_masks import DeviceMasks, wants_runs
from serve_app.models.messages import Masks, SegmentationRequest

# run_decoder(entry, points=, labels=, boxes=, multimask=) -> (pred_masks (1, P, K, h, w), iou (1, P, K))
RunDecoder = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# upsample(low_res (n, h, w), entry, original (H, W)) -> (n, H, W) bool: numpy, or with on_device a device tensor
Upsample = Callable[[torch.Tensor, Any, tuple[int, int]], np.ndarray | torch.Tensor]


def has_points(request: SegmentationRequest) -> bool:
    return request.points is not None and len(request.points) > 0


def scale_to_input(coords: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int],
                   device: torch.device) -> torch.Tensor:
    """Pixel coordinates (..., 2) of the original image -> the encoder input's (x by width, y by height)."""
    scaled = torch.as_tensor(np.asarray(coords, np.float32)).reshape(-1, 2).clone()
    scaled[:, 0] *= input_size[1] / original_size[1]
    scaled[:, 1] *= input_size[0] / original_size[0]
    return scaled.to(device)


def decode_prompts(request: SegmentationRequest, entry: Any, run_decoder: RunDecoder, upsample: Upsample, *,
                   chunk: int, device: torch.device, on_device: bool = False) -> Masks | DeviceMasks:
    """`entry`: the image's cached embedding (a CachedEmbedding: its `input_size` scales the prompts). With
    `on_device`, `upsample` leaves the masks on the device and so does the answer (serve_app.models.device_masks)."""
    original_size, input_size = request.image.shape[:2], entry.input_size
    if has_points(request):
        points = scale_to_input(request.points, input_size, original_size, device)[None, None]
        labels = torch.as_tensor(np.asarray(request.point_labels, np.int64), device=device)[None, None]
        box = None
        if len(request.boxes):
            box = scale_to_input(request.boxes[:1], input_size, original_size, device).reshape(1, 1, 4)
        multimask = box is None and points.shape[2] == 1  # a lone click is ambiguous: keep the best of three
        low_res, iou = run_decoder(entry, points=points, labels=labels, boxes=box, multimask=multimask)
        best = int(iou[0, 0].argmax())  # only the kept candidate is up-sampled
        masks, scores = [upsample(low_res[0, 0, best:best + 1], entry, original_size)], [iou[0, 0, best:best + 1]]
    else:
        boxes = scale_to_input(request.boxes, input_size, original_size, device).reshape(-1, 4)
        masks, scores = [], []
        for start in range(0, len(boxes), chunk):
            low_res, iou = run_decoder(entry, boxes=boxes[None, start:start + chunk])
            masks.append(upsample(low_res[0, :, 0], entry, original_size))
            scores.append(iou[0, :, 0])
    if on_device:
        return DeviceMasks(torch.cat(masks), torch.cat(scores), as_runs=wants_runs(request))
    return Masks(masks=np.concatenate(masks), scores=torch.cat(scores).float().cpu().numpy())
