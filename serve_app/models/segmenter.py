"""Boxes to masks with SAM, with one image-encoder pass over a batch of images of any sizes.

The per-image steps (resize of the longest side, normalisation and padding, box transform,
mask post-processing) are segment-anything's own, so results match `SamPredictor`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from serve_app.models.device import autocast_for, pick_device
from serve_app.models.messages import Masks, SegmentationRequest

logger = logging.getLogger(__name__)


class SamSegmenter:
    """Wraps a segment-anything `Sam` (any size) for batched box prompts."""

    def __init__(self, sam, device: torch.device, encoder_batch_size: int = 8, decoder_chunk: int = 16,
                 precision: str = "fp32"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.precision = precision
        self.sam = sam.to(device).eval()
        self.device = device
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.encoder_batch_size = max(1, encoder_batch_size)
        self.decoder_chunk = max(1, decoder_chunk)  # bounds the full-resolution float masks held at once

    @classmethod
    def load(cls, checkpoint: str, model_type: str = "auto", device: str = "auto", precision: str = "fp32",
             setting: str = "SAM_CHECKPOINT", sha256: str = "", cache_dir: str = "") -> "SamSegmenter":
        """`checkpoint` is a path or URL (downloaded once into `cache_dir`); errors name `setting`."""
        from serve_app.models.checkpoints import resolve_checkpoint
        from serve_app.models.sam_loading import CheckpointError, load_sam

        path = resolve_checkpoint(checkpoint, setting, cache_dir or None, sha256)
        try:
            sam, _ = load_sam(path, model_type)
        except CheckpointError as exc:
            raise CheckpointError(f"{setting}: {exc}") from None
        return cls(sam, pick_device(device), precision=precision)

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        resized = self.transform.apply_image(image)
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor), tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings for a list of images, encoded in batches."""
        prepared = [self._prepare(image) for image in images]
        input_sizes = [size for _, size in prepared]
        chunks = []
        for start in range(0, len(prepared), self.encoder_batch_size):
            batch = torch.cat([t for t, _ in prepared[start:start + self.encoder_batch_size]])
            with autocast_for(self.device, self.precision):
                chunks.append(self.sam.image_encoder(batch).float())
        return torch.cat(chunks), input_sizes

    @torch.inference_mode()
    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        results = [Masks(masks=np.zeros((0, *r.image.shape[:2]), bool)) for r in requests]
        active = [i for i, r in enumerate(requests) if len(r.boxes)]
        if not active:
            return results
        embeddings, input_sizes = self.embed([requests[i].image for i in active])
        for row, i in enumerate(active):
            results[i] = self._decode(embeddings[row:row + 1], input_sizes[row], requests[i])
        return results

    def _decode(self, embedding: torch.Tensor, input_size: tuple[int, int], request: SegmentationRequest) -> Masks:
        original_size = request.image.shape[:2]
        boxes = torch.as_tensor(np.asarray(request.boxes, np.float32), device=self.device)
        boxes = self.transform.apply_boxes_torch(boxes, original_size)
        masks, scores = [], []
        for start in range(0, len(boxes), self.decoder_chunk):
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes[start:start + self.decoder_chunk], masks=None)
            low_res, iou = self.sam.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            full = self.sam.postprocess_masks(low_res, input_size, original_size)
            masks.append((full[:, 0] > self.sam.mask_threshold).cpu().numpy())
            scores.append(iou[:, 0].float().cpu().numpy())
        return Masks(masks=np.concatenate(masks), scores=np.concatenate(scores).astype(np.float32))
