"""Boxes and clicks to masks with the SAM family as transformers ships it: SAM 2 / 2.1, SAM-HQ, EdgeTAM and SAM.

The family is read from the checkpoint's `config.json`. Each image is prepared by the family's own image
processor and encoded once (in batches, cached by content); prompts are scaled to the encoder's input the way
the family's processor scales them, and the low-resolution masks are up-sampled as its `post_process_masks`
does, in each mask's window (serve_app.models.mask_upsampling), so results match the model card's
processor → model → post-processing path. On a GPU, as SamSegmenter does, a torchvision-based processor prepares
images there and the masks are up-sampled there, coming to the host as run starts when only RLE is wanted
(serve_app.models.device_masks).
"""

from __future__ import annotations

import numpy as np
import torch

from serve_app import get_logger
from serve_app.models.device import autocast_for, effective_precision, pick_device, takes_tensors
from serve_app.models.embedding_cache import CachedEmbedding, EmbeddingCache, own_row
from serve_app.models.catalog import SEGMENTER, Family
from serve_app.models.compiled import compiled_encoder
from serve_app.models.device_masks import decode_each, upsample_on_device
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.mask_upsampling import upsample_masks
from serve_app.models.messages import Masks, SegmentationRequest
from serve_app.models.prompt_decoding import decode_prompts, has_points
from serve_app.models.spec import ModelSpec

logger = get_logger(__name__)


class HfSamSegmenter:
    """One transformers SAM-family model for batched box prompts and clicks, with an embedding cache."""

    def __init__(self, model, processor, family: Family, device: torch.device, *, encoder_batch_size: int = 8,
                 decoder_chunk: int = 0, precision: str = "fp32", cache_bytes: int = 0,
                 pixels_on_device: bool | None = None, compile: str = "off"):
        self.model = model.to(device).eval()
        self.processor = processor
        self.image_processor = processor.image_processor
        self.family = family
        self.padded = bool(family.details["padded"])
        self.device = device
        self.precision = effective_precision(device, precision)
        self.cache = EmbeddingCache(cache_bytes)
        self.images_encoded = 0
        self.encoder_batch_size = max(1, encoder_batch_size)
        # as SamSegmenter: on CPU a few boxes at a time keep the decoder's activations in cache
        self.decoder_chunk = decoder_chunk if decoder_chunk > 0 else (4 if device.type == "cpu" else 64)
        # as SamSegmenter: pixel work on the model's device off a CPU (the same results either way)
        self.pixels_on_device = device.type != "cpu" if pixels_on_device is None else pixels_on_device
        self.encoder = compiled_encoder(self.model.get_image_embeddings, compile, device, f"{family.name} image encoder")
        self.encoder_batch_size = self.encoder.batch_size(self.encoder_batch_size)
        # the encoder's input shape, whatever the image
        self.encoder.warm_up_on(lambda: self._prepare(np.zeros((64, 64, 3), np.uint8))[0].to(device), self._encode,
                                self.encoder_batch_size)

    def _encode(self, pixels: torch.Tensor):
        with autocast_for(self.device, self.precision):
            return self.encoder(pixels)

    @classmethod
    def load(cls, model_id_or_path: str, *, device: str = "auto", precision: str = "fp32",
             cache_bytes: int = 0) -> "HfSamSegmenter":
        """From a hub id (cached under HF_HOME; HF_HUB_OFFLINE=1 uses only the cache) or a local directory."""
        from serve_app.models.loading import load_as

        return load_as(cls, ModelSpec(SEGMENTER, model_id_or_path, "SEGMENTER_MODEL", device=device,
                                      precision=precision, cache_bytes=cache_bytes))

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "HfSamSegmenter":
        import transformers

        torch_device = pick_device(spec.device)
        model_class = family.details["model_class"]
        try:
            logger.info("loading %s from %s on %s", family.name, spec.checkpoint, torch_device)
            processor = getattr(transformers, family.details["processor_class"]).from_pretrained(spec.checkpoint)
            model, loading = getattr(transformers, model_class).from_pretrained(spec.checkpoint,
                                                                                output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(describe_load_failure(spec.checkpoint, exc, "SAM-family", spec.setting)) from None
        if loading.get("missing_keys"):  # they would be random: refuse rather than serve noise
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"{spec.setting}={spec.checkpoint!r}: the checkpoint lacks {len(missing)} of "
                                 f"{model_class}'s weights (for example {', '.join(missing[:3])})")
        return cls(model, processor, family, torch_device, precision=spec.precision, cache_bytes=spec.cache_bytes,
                   compile=spec.compile)

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixel values and the size of the image inside them (before padding, where the family pads)."""
        if self.pixels_on_device and takes_tensors(self.image_processor):  # only the original crosses to the device
            chw = torch.from_numpy(np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])).permute(2, 0, 1)
            prepared = self.image_processor(images=[chw], return_tensors="pt", device=self.device)
        else:
            prepared = self.image_processor(images=[image], return_tensors="pt")
        pixels = prepared["pixel_values"]
        if self.padded:
            return pixels, tuple(int(v) for v in prepared["reshaped_input_sizes"][0])
        return pixels, tuple(pixels.shape[-2:])

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> list[CachedEmbedding]:
        """One cache entry per image: whatever the family's decoder reads, for that image alone."""
        self.images_encoded += len(images)
        prepared = [self._prepare(image) for image in images]
        entries = []
        for start in range(0, len(prepared), self.encoder_batch_size):
            chunk = prepared[start:start + self.encoder_batch_size]
            encoded = self._encode(torch.cat([p for p, _ in chunk]).to(self.device))
            for row, (p, input_size) in enumerate(chunk):
                entries.append(CachedEmbedding(_decoder_inputs(encoded, row), input_size,
                                               encoder_size=int(p.shape[-1])))
        return entries

    @torch.inference_mode()
    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        active = [i for i, r in enumerate(requests) if len(r.boxes) or has_points(r)]
        entries, encoded_now = self.cache.lookup_or_encode(
            [requests[i].image for i in active], [requests[i].image_key for i in active], self.embed)
        return decode_each(requests, active, entries, encoded_now, lambda request, entry: decode_prompts(
            request, entry, self._run_decoder, self._upsample, chunk=self.decoder_chunk, device=self.device,
            on_device=self.pixels_on_device))

    def _run_decoder(self, cached: CachedEmbedding, *, points=None, labels=None, boxes=None, multimask=False):
        """(pred_masks (1, prompts, candidates, h, w), iou_scores (1, prompts, candidates))."""
        with autocast_for(self.device, self.precision):
            out = self.model(**cached.embedding, input_points=points, input_labels=labels, input_boxes=boxes,
                             multimask_output=multimask)
        return out.pred_masks, out.iou_scores

    def _upsample(self, low_res: torch.Tensor, cached: CachedEmbedding, original_size) -> np.ndarray | torch.Tensor:
        upsample = upsample_on_device if self.pixels_on_device else upsample_masks
        if self.padded:  # resize to the padded square, crop the padding, resize to the image
            return upsample(low_res.float(), cached.input_size, original_size, cached.encoder_size)
        side = low_res.shape[-1]  # one resize straight to the image: the identity first step of the same map
        return upsample(low_res.float(), (side, side), original_size, side)


def _decoder_inputs(encoded, row: int) -> dict:
    """The keyword arguments the family's forward takes instead of pixel values, for one image."""
    if isinstance(encoded, tuple):  # SAM-HQ: the last embedding and the ViT's intermediate ones
        embedding, intermediate = encoded
        return {"image_embeddings": own_row(embedding, row),
                "intermediate_embeddings": [own_row(t, row) for t in intermediate]}
    if isinstance(encoded, list):  # SAM 2 / EdgeTAM: the feature pyramid, finest first
        return {"image_embeddings": [own_row(t, row) for t in encoded]}
    return {"image_embeddings": own_row(encoded, row)}



