"""Boxes to masks with SAM, with one image-encoder pass over a batch of images of any sizes.

The per-image steps (resize of the longest side, normalisation and padding, box transform) are
segment-anything's own, and the mask post-processing computes SAM's exactly, so results match `SamPredictor`.
Where the pixel work runs depends on the device:
- on a CPU, Pillow resizes and each mask is up-sampled in its window (serve_app.models.mask_upsampling);
- on a GPU, the same resize (serve_app.models.pil_resize), SAM's up-sampling and, when only RLE is wanted, the
  runs' search (serve_app.models.device_masks) run on the GPU, so the replica's one CPU thread mostly launches.
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app import get_logger
from serve_app.models.catalog import SEGMENTER, Family
from serve_app.models.checkpoints import resolve_checkpoint
from serve_app.models.compiled import compiled_encoder
from serve_app.models.device import autocast_for, effective_precision, pick_device
from serve_app.models.embedding_cache import CachedEmbedding, EmbeddingCache
from serve_app.models.errors import CheckpointError
from serve_app.models.device_masks import DeviceMasks, decode_each, upsample_on_device, wants_runs
from serve_app.models.mask_upsampling import upsample_masks
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.pil_resize import resize_like_pil
from serve_app.models.prompt_decoding import has_points
from serve_app.models.sam_decoder import SharedImageDecoder
from serve_app.models.sam_loading import load_sam
from serve_app.models.spec import ModelSpec

logger = get_logger(__name__)


class SamSegmenter:
    """Wraps a segment-anything `Sam` (any size) for batched box prompts."""

    def __init__(self, sam, device: torch.device, *, encoder_batch_size: int = 8, decoder_chunk: int = 0,
                 precision: str = "fp32", cache_bytes: int = 0, pixels_on_device: bool | None = None,
                 compile: str = "off"):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.precision = effective_precision(device, precision)
        self.cache = EmbeddingCache(cache_bytes)
        self.images_encoded = 0  # proof for tests and metrics that a cache hit did not run the encoder
        self.sam = sam.to(device).eval()
        self.device = device
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.encoder_batch_size = max(1, encoder_batch_size)
        # Boxes decoded at once. Each holds 64² x 256 floats of activations per step: on CPU 2 at a time stay in
        # cache and decoded 20 boxes faster than 1, 4, 8 or 20 at a time (docs/performance.md); a GPU wants wide
        # batches.
        self.decoder_chunk = decoder_chunk if decoder_chunk > 0 else (2 if device.type == "cpu" else 64)
        # Resize and mask pixels on the model's device (default: off a CPU, where Pillow and the windowed
        # up-sampling are faster); the results are the same either way.
        self.pixels_on_device = device.type != "cpu" if pixels_on_device is None else pixels_on_device
        self.encoder = compiled_encoder(self.sam.image_encoder.forward, compile, device, "SAM image encoder")
        self.encoder_batch_size = self.encoder.batch_size(self.encoder_batch_size)
        size = self.sam.image_encoder.img_size
        self.encoder.warm_up_on(lambda: torch.zeros(1, 3, size, size, device=device), self._encode,
                                self.encoder_batch_size)

    def _encode(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device, self.precision):
            return self.encoder(batch).float()

    @classmethod
    def load(cls, checkpoint: str, *, model_type: str = "auto", device: str = "auto", precision: str = "fp32",
             setting: str = "SAM_CHECKPOINT", sha256: str = "", cache_dir: str = "",
             cache_bytes: int = 0) -> "SamSegmenter":
        """`checkpoint` is a path or URL (downloaded once into `cache_dir`); errors name `setting`."""
        from serve_app.models.loading import load_as

        return load_as(cls, ModelSpec(SEGMENTER, checkpoint, setting, device=device, precision=precision,
                                      cache_bytes=cache_bytes, sam_model_type=model_type, sha256=sha256,
                                      cache_dir=cache_dir))

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "SamSegmenter":
        path = resolve_checkpoint(spec.checkpoint, spec.setting, spec.cache_dir or None, spec.sha256)
        try:
            sam, _ = load_sam(path, spec.sam_model_type)
        except CheckpointError as exc:
            raise CheckpointError(f"{spec.setting}: {exc}") from None
        return cls(sam, pick_device(spec.device), precision=spec.precision, cache_bytes=spec.cache_bytes,
                   compile=spec.compile)

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        if self.pixels_on_device:  # only the original crosses to the device
            size = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.transform.target_length)
            pixels = np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])  # torch wraps writable arrays only
            resized = resize_like_pil(torch.as_tensor(pixels, device=self.device), size)
        else:
            resized = torch.as_tensor(self.transform.apply_image(image), device=self.device)
        tensor = resized.permute(2, 0, 1).contiguous()[None]
        return self.sam.preprocess(tensor), tuple(resized.shape[:2])

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Image embeddings for a list of images, encoded in batches."""
        self.images_encoded += len(images)
        prepared = [self._prepare(image) for image in images]
        input_sizes = [size for _, size in prepared]
        chunks = []
        for start in range(0, len(prepared), self.encoder_batch_size):
            chunks.append(self._encode(torch.cat([t for t, _ in prepared[start:start + self.encoder_batch_size]])))
        return torch.cat(chunks), input_sizes

    @torch.inference_mode()
    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        """Encode each distinct uncached image once (in batches), then decode every request's prompts."""
        active = [i for i, r in enumerate(requests) if len(r.boxes) or has_points(r)]
        entries, encoded_now = self.cache.lookup_or_encode(
            [requests[i].image for i in active], [requests[i].image_key for i in active], self._entries)
        return decode_each(requests, active, entries, encoded_now, lambda request, entry: self._decode(entry, request))

    def _entries(self, images: list[np.ndarray]) -> list[CachedEmbedding]:
        encoded, input_sizes = self.embed(images)
        return [CachedEmbedding(encoded[row:row + 1].clone(), input_sizes[row]) for row in range(len(images))]

    def _decode(self, cached: CachedEmbedding, request: SegmentationRequest) -> Masks | DeviceMasks:
        if has_points(request):
            return self._decode_points(cached, request)
        original_size = request.image.shape[:2]
        boxes = torch.as_tensor(np.asarray(request.boxes, np.float32), device=self.device)
        boxes = self.transform.apply_boxes_torch(boxes, original_size)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        decoder = SharedImageDecoder(self.sam.mask_decoder, cached.embedding, self.sam.prompt_encoder.get_dense_pe(),
                                     dense[:1])  # the image-side work every box shares, done once
        chunks, scores = [], []  # per chunk of boxes: logits (on the device) or, on a CPU, masks up-sampled
        for start in range(0, len(boxes), self.decoder_chunk):
            logits, iou = decoder(sparse[start:start + self.decoder_chunk])
            logits = logits[:, 0]
            chunks.append(logits if self.pixels_on_device else self._upsample(logits, cached, original_size))
            scores.append(iou[:, 0])
        if not self.pixels_on_device:
            return Masks(masks=np.concatenate(chunks), scores=torch.cat(scores).float().cpu().numpy())
        return self._on_device(torch.cat(chunks), torch.cat(scores), cached, original_size, request)

    def _decode_points(self, cached: CachedEmbedding, request: SegmentationRequest) -> Masks | DeviceMasks:
        """All clicks (and the first box, if any) refine one mask. A lone click is ambiguous, so as SAM
        recommends, three candidates are decoded and the one with the best predicted IoU is kept."""
        original_size = request.image.shape[:2]
        coords = torch.as_tensor(np.asarray(request.points, np.float32), device=self.device)[None]
        coords = self.transform.apply_coords_torch(coords, original_size)
        labels = torch.as_tensor(np.asarray(request.point_labels, np.int64), device=self.device)[None]
        box = None
        if len(request.boxes):
            box = self.transform.apply_boxes_torch(
                torch.as_tensor(np.asarray(request.boxes[:1], np.float32), device=self.device), original_size)
        multimask = box is None and coords.shape[1] == 1
        low_res, iou = self._run_decoder(cached, points=(coords, labels), boxes=box, multimask=multimask)
        best = int(iou[0].argmax())  # only the kept candidate is up-sampled
        if self.pixels_on_device:
            return self._on_device(low_res[0, best:best + 1], iou[0, best:best + 1], cached, original_size, request)
        return Masks(masks=self._upsample(low_res[0, best:best + 1], cached, original_size),
                     scores=iou[0, best:best + 1].float().cpu().numpy())

    def _upsample(self, low_res: torch.Tensor, cached: CachedEmbedding, original_size) -> np.ndarray:
        return upsample_masks(low_res, cached.input_size, original_size, self.sam.image_encoder.img_size,
                              self.sam.mask_threshold)

    def _on_device(self, low_res: torch.Tensor, scores: torch.Tensor, cached: CachedEmbedding, original_size,
                   request: SegmentationRequest) -> DeviceMasks:
        """Masks up-sampled on the device, to be copied to the host as run starts when RLE is all the request
        wants."""
        masks = upsample_on_device(low_res, cached.input_size, original_size, self.sam.image_encoder.img_size,
                                   self.sam.mask_threshold)
        return DeviceMasks(masks, scores, as_runs=wants_runs(request))

    def _run_decoder(self, cached: CachedEmbedding, points=None, boxes=None, multimask=False):
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=cached.embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low_res, iou
