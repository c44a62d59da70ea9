"""Grounding DINO and its family through transformers, batched over images with different prompts.

The family is read from the checkpoint's config: Grounding DINO (`grounding-dino`) and MM Grounding DINO
(`mm-grounding-dino`, which LLMDet checkpoints also use) share the processor, the caption format and the output
(a score per query and text token, boxes as normalised cx, cy, w, h), so one class serves them.

Each item in a batch carries its own phrases and thresholds. Detections are assigned to the
prompt phrase whose tokens score highest, instead of decoding text from token subsets as
transformers' post-processing does, so a box always maps back to exactly one phrase the
user typed (and from there to one Label Studio label).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from serve_app import get_logger
from serve_app.models.device import autocast_for, effective_precision, pick_device, takes_tensors
from serve_app.models.catalog import DEFAULT_DETECTOR, DETECTOR, Family
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.messages import DetectionRequest, Detections
from serve_app.models.spec import ModelSpec

logger = get_logger(__name__)

def build_caption(phrases: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join phrases the way Grounding DINO was trained ("a cat. a dog.") and return char spans."""
    caption, spans = "", []
    for phrase in phrases:
        start = len(caption)
        caption += phrase.lower()
        spans.append((start, len(caption)))
        caption += ". "
    return caption.strip(), spans


def phrase_token_masks(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], length: int) -> torch.Tensor:
    """Boolean (num_phrases, length) mask of the tokens that belong to each phrase."""
    masks = torch.zeros((len(spans), length), dtype=torch.bool)
    for token_index, (start, end) in enumerate(offsets[:length]):
        if end <= start:  # special and padding tokens have empty offsets
            continue
        for phrase_index, (span_start, span_end) in enumerate(spans):
            if start >= span_start and end <= span_end:
                masks[phrase_index, token_index] = True
                break
    return masks


class GroundingDinoDetector:
    """Loads a Grounding DINO checkpoint (hub id or local directory) and detects phrases in images."""

    # detect() may run on several threads at once (CPU lanes, serve_app.deployments.batching): the model's forward
    # keeps no state, and the one shared tokenizer is used under a lock
    concurrent_batches = True

    def __init__(self, model, processor, device: torch.device, *, precision: str = "fp32"):
        self.model = model
        self.precision = effective_precision(device, precision)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.device = device
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))
        # a fast tokenizer called with padding or truncation from two threads at once raises "Already borrowed"
        self._tokenizer_lock = threading.Lock()
        # transformers' torchvision image processors take tensors and resize where they are told; a GPU
        # replica has one CPU thread, where resizing and normalising a batch of images would wait on it
        self.preprocess_on = device if takes_tensors(self.image_processor) and device.type == "cuda" else None

    @classmethod
    def load(cls, model_id_or_path: str = DEFAULT_DETECTOR, *, device: str = "auto",
             precision: str = "fp32") -> "GroundingDinoDetector":
        """From a hub id (cached under HF_HOME; HF_HUB_OFFLINE=1 uses only the cache) or a local directory, through
        the catalog (serve_app.models.loading): a checkpoint of another family is refused, naming it."""
        from serve_app.models.loading import load_as

        return load_as(cls, ModelSpec(DETECTOR, model_id_or_path, device=device, precision=precision))

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "GroundingDinoDetector":
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        torch_device = pick_device(spec.device)
        try:
            logger.info("loading %s from %s on %s", family.name, spec.checkpoint, torch_device)
            processor = AutoProcessor.from_pretrained(spec.checkpoint)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(spec.checkpoint)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(describe_load_failure(spec.checkpoint, exc, family.name, spec.setting)) from None
        model.to(torch_device).eval()
        return cls(model, processor, torch_device, precision=spec.precision)

    @torch.inference_mode()
    def detect(self, requests: list[DetectionRequest]) -> list[Detections]:
        """Detect every request's phrases; requests without phrases get no detections.

        Images whose resized shapes match share one forward pass, with prompts padded to the longest.
        Images of other shapes run in their own pass: padding an image changes what the backbone sees,
        and a task's boxes must not depend on which other requests it was batched with.
        """
        results = [Detections() for _ in requests]
        active = [i for i, r in enumerate(requests) if r.phrases]
        pixels = {i: self._pixels(requests[i].image) for i in active}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in active:
            groups.setdefault(tuple(pixels[i]["pixel_values"].shape[-2:]), []).append(i)
        for members in groups.values():
            batch = {key: torch.cat([pixels[i][key] for i in members]) for key in pixels[members[0]]}
            for i, detections in zip(members, self._forward([requests[i] for i in members], batch)):
                results[i] = detections
        return results

    def _pixels(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """Resized and normalised pixels (and mask) of one RGB image, on the GPU when the processor can work there."""
        if not takes_tensors(self.image_processor):
            return self.image_processor(images=[Image.fromarray(image)], return_tensors="pt")
        if not image.flags.writeable:  # images that arrive through Ray's object store are read-only views
            image = image.copy()
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        extra = {"device": self.preprocess_on} if self.preprocess_on is not None else {}
        return self.image_processor(images=[chw], return_tensors="pt", **extra)

    def _forward(self, requests: list[DetectionRequest], pixels: dict[str, torch.Tensor]) -> list[Detections]:
        captions, spans = zip(*(build_caption(r.phrases) for r in requests))
        with self._tokenizer_lock:
            text = self.tokenizer(
                list(captions),
                padding="longest",
                truncation=True,
                max_length=self.max_text_len,
                return_offsets_mapping=True,
                return_tensors="pt",
            )
        offsets = text.pop("offset_mapping").tolist()
        inputs = {k: v.to(self.device) for k, v in {**text, **pixels}.items()}
        with autocast_for(self.device, self.precision):
            outputs = self.model(**inputs)

        length = text["input_ids"].shape[1]
        probs = outputs.logits[:, :, :length].float().sigmoid().cpu()
        pred_boxes = outputs.pred_boxes.float().cpu()
        return [
            self._select(request, probs[row], pred_boxes[row], phrase_token_masks(offsets[row], list(spans[row]), length))
            for row, request in enumerate(requests)
        ]

    @staticmethod
    def _select(request: DetectionRequest, probs: torch.Tensor, boxes: torch.Tensor,
                token_masks: torch.Tensor) -> Detections:
        """Keep queries above the box threshold and give each the best-scoring phrase.

        box score = best token probability over all phrase tokens (Grounding DINO's box threshold);
        phrase score = mean token probability of that phrase, which must reach the text threshold.
        """
        usable = token_masks.any(dim=1)  # phrases truncated away have no tokens
        if not bool(usable.any()):
            return Detections()
        any_phrase_token = token_masks.any(dim=0)
        box_scores = probs.masked_fill(~any_phrase_token, 0).max(dim=1).values
        counts = token_masks.sum(dim=1).clamp(min=1).to(probs.dtype)
        phrase_scores = (probs @ token_masks.T.to(probs.dtype)) / counts  # (queries, phrases)
        phrase_scores[:, ~usable] = -1
        best_phrase_scores, best_phrases = phrase_scores.max(dim=1)

        keep = (box_scores > request.box_threshold) & (best_phrase_scores >= request.text_threshold)
        order = torch.argsort(box_scores.masked_fill(~keep, -1), descending=True)
        order = order[: int(keep.sum())][: max(0, request.max_detections)]

        height, width = request.image.shape[:2]
        cx, cy, w, h = boxes[order].unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        xyxy = xyxy * torch.tensor([width, height, width, height], dtype=xyxy.dtype)
        xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
        xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
        return Detections(
            boxes=xyxy.numpy().astype(np.float32),
            scores=box_scores[order].numpy().astype(np.float32),
            phrase_ids=best_phrases[order].numpy().astype(np.int64),
        )
