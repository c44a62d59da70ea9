"""Detectors that score each box against a list of text queries: OWLv2 and OmDet-Turbo, through transformers.

The family is read from the checkpoint's config (`owlv2`, `omdet-turbo`). Unlike Grounding DINO, which reads one
caption and scores boxes per token, these models embed every label on its own and score each box against each
label, so a request's phrases are the queries, one per phrase, and a detection's phrase_id is the index of its
query: no token spans to map back. Phrases go in as typed: both families read text with CLIP's tokenizer, which
lower-cases (and NFC-normalises) by itself, as it did in training. Texts longer than the text model's length
(OWLv2 16 tokens, OmDet-Turbo 77) are truncated, keeping the end-of-text token the models pool at.

Thresholds, per family (the reference is each family's own `post_process_grounded_object_detection`):

- box_threshold is the family's score threshold: a box is kept when its score is above it.
  OWLv2: one box per image patch, scored sigmoid(logit) of its best query, which gives its label.
  OmDet-Turbo: a score per (decoder query, label) pair, sigmoid(logit); pairs above the threshold go through
  per-label non-maximum suppression at OMDET_NMS_THRESHOLD (IoU), so a box may come back under two labels.
- text_threshold has no meaning for families with one query per label, and is ignored.
- max_detections keeps the highest scores.

Boxes are in the original image's pixels, clamped to the image (OWLv2 predicts on the image padded to a square
and does not clip).

Exemplars (OWLv2 only): each exemplar box's crop of the image is a query image, embedded as transformers'
`image_guided_detection` embeds one (the crop's most object-like box's class embedding, `embed_image_query`), and
scored against the image's patches beside the phrases' text queries. A phrase's score is the best of its queries
that passes its own threshold: the text's box_threshold, the positive exemplars' exemplar_threshold (EXEMPLAR_THRESHOLD:
image-conditioned scores are on another scale than text ones); a patch that matches one of the phrase's negative
exemplars better than its positives and text is not that phrase. Detections then go through OWLv2's image-guided
non-maximum suppression (IoU above EXEMPLAR_NMS_THRESHOLD, across phrases: an object found by text and by an exemplar
is one region).
Scores are sigmoid(logit), not the display alphas `post_process_image_guided_detection` rescales them to.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from serve_app import get_logger
from serve_app.models.device import autocast_for, effective_precision, pick_device
from serve_app.models.embedding_cache import CachedEmbedding, EmbeddingCache, own_row
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.catalog import DETECTOR, Family, families_for
from serve_app.models.messages import DetectionRequest, Detections, PromptUnsupported
from serve_app.models.spec import ModelSpec

logger = get_logger(__name__)

# IoU above which OmDet-Turbo's per-label NMS drops the lower-scoring box: the default of its post-processing,
# which its model card uses.
OMDET_NMS_THRESHOLD = 0.5
# IoU above which a lower-scoring detection of an exemplar search is dropped: post_process_image_guided_detection's
# default
EXEMPLAR_NMS_THRESHOLD = 0.3
# OmDetTurboProcessor pads and truncates task and label texts to this many tokens.
OMDET_TEXT_LENGTH = 77


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)"""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def _crop(image: np.ndarray, box) -> Image.Image:
    """The exemplar's pixels, whole pixels covering the box, at least one."""
    height, width = image.shape[:2]
    x0, y0 = int(np.clip(np.floor(box[0]), 0, width - 1)), int(np.clip(np.floor(box[1]), 0, height - 1))
    x1, y1 = int(np.clip(np.ceil(box[2]), x0 + 1, width)), int(np.clip(np.ceil(box[3]), y0 + 1, height))
    return Image.fromarray(image[y0:y1, x0:x1])


def _detections(request: DetectionRequest, scores: torch.Tensor, labels: torch.Tensor,
                boxes: torch.Tensor, threshold: float | None = None) -> Detections:
    """Candidates above the box threshold, best first, at most max_detections, boxes clamped to the image."""
    keep = torch.nonzero(scores > (request.box_threshold if threshold is None else threshold)).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][: max(0, request.max_detections)]
    height, width = request.image.shape[:2]
    xyxy = boxes[keep].clone()
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    return Detections(
        boxes=xyxy.numpy().astype(np.float32),
        scores=scores[keep].numpy().astype(np.float32),
        phrase_ids=labels[keep].numpy().astype(np.int64),
    )


class QueryDetector:
    """Loads an OWLv2 or OmDet-Turbo checkpoint (hub id or local directory) and detects phrases in images;
    the same interface as serve_app.models.grounding_dino.GroundingDinoDetector."""

    def __init__(self, model, processor, device: torch.device, *, precision: str = "fp32", cache_bytes: int = 0):
        self.model = model
        # OWLv2's image feature maps by image content: an exemplar prompt after a text prompt (or another exemplar)
        # on the same image skips the vision encoder
        self.cache = EmbeddingCache(cache_bytes)
        self.images_encoded = 0
        self.family = model.config.model_type
        runs = [f.model_type for f in families_for(DETECTOR) if f.loader == f"{__name__}:QueryDetector"]
        if self.family not in runs:
            raise ValueError(f"QueryDetector runs {', '.join(runs)}, not {self.family!r}")
        self.precision = effective_precision(device, precision)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.device = device
        if self.family == "owlv2":
            # Owlv2Processor pads every query to the tokenizer's length; the text model has this many positions
            self.text_length = min(int(self.tokenizer.model_max_length),
                                   int(model.config.text_config.max_position_embeddings))
        else:
            self.text_length = OMDET_TEXT_LENGTH

    @classmethod
    def load(cls, model_id_or_path: str, *, device: str = "auto", precision: str = "fp32") -> "QueryDetector":
        """From a hub id (cached under HF_HOME; HF_HUB_OFFLINE=1 uses only the cache) or a local directory."""
        from serve_app.models.loading import load_as

        return load_as(cls, ModelSpec(DETECTOR, model_id_or_path, device=device, precision=precision))

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> "QueryDetector":
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        torch_device = pick_device(spec.device)
        model_id_or_path, precision = spec.checkpoint, spec.precision
        try:
            logger.info("loading %s from %s on %s", family.name, model_id_or_path, torch_device)
            processor = AutoProcessor.from_pretrained(model_id_or_path)
            model, info = AutoModelForZeroShotObjectDetection.from_pretrained(model_id_or_path,
                                                                             output_loading_info=True)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(describe_load_failure(model_id_or_path, exc, family.name, spec.setting)) from None
        missing = list(info.get("missing_keys") or [])
        if missing:  # transformers would start those weights at random and detect noise
            shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"{spec.setting}={model_id_or_path!r}: the checkpoint has no weights for "
                                 f"{len(missing)} of the {family.name} model's parameters ({shown}); it is incomplete "
                                 "or was saved for another architecture")
        model.to(torch_device).eval()
        return cls(model, processor, torch_device, precision=precision, cache_bytes=spec.cache_bytes)

    @torch.inference_mode()
    def detect(self, requests: list[DetectionRequest]) -> list[Detections]:
        """Detect every request's phrases; requests without phrases get no detections.

        Images whose processed shapes match share one forward pass, each with its own queries (both families
        resize to a fixed square, so that is usually all of them). OWLv2 scores each query on its own, so requests
        with different numbers of phrases share a pass, the missing queries padded and masked. OmDet-Turbo does not:
        it pads labels with zero embeddings that still take part in choosing its decoder queries, so only requests
        with as many phrases share a pass; a task's boxes must not depend on which other requests it was batched
        with.
        """
        results = [Detections() for _ in requests]
        active = [i for i, r in enumerate(requests) if r.phrases]
        searched = [i for i in active if requests[i].exemplar_boxes is not None and len(requests[i].exemplar_boxes)]
        if searched and self.family != "owlv2":
            raise PromptUnsupported(f"{self.family} takes no exemplar boxes")
        active = [i for i in active if i not in searched]
        for i in searched:  # one image and its crops a pass
            results[i] = self._owlv2_exemplars(requests[i])
        pixels = {i: self.image_processor(images=[Image.fromarray(requests[i].image)],
                                          return_tensors="pt")["pixel_values"] for i in active}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in active:
            key = tuple(pixels[i].shape[-2:])
            if self.family == "omdet-turbo":
                key += (len(requests[i].phrases),)
            groups.setdefault(key, []).append(i)
        forward = self._owlv2 if self.family == "owlv2" else self._omdet_turbo
        for members in groups.values():
            batch = torch.cat([pixels[i] for i in members]).to(self.device)
            for i, detections in zip(members, forward([requests[i] for i in members], batch)):
                results[i] = detections
        return results

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_length,
                              return_token_type_ids=False, return_tensors="pt")

    def _owlv2(self, requests: list[DetectionRequest], pixel_values: torch.Tensor) -> list[Detections]:
        counts = [len(r.phrases) for r in requests]
        text = self._tokenize([phrase for r in requests for phrase in r.phrases])
        # (images, queries, tokens), each image's queries padded to the most in the batch. Owlv2Processor pads
        # with " " queries, which the model scores like real ones; a query whose first id is 0 is one it masks.
        shape = (len(requests), max(counts), text["input_ids"].shape[1])
        input_ids = torch.zeros(shape, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        attention_mask[:, :, 0] = 1  # a padded query attends to its one token, so its (unused) embedding is finite
        start = 0
        for row, count in enumerate(counts):
            input_ids[row, :count] = text["input_ids"][start:start + count]
            attention_mask[row, :count] = text["attention_mask"][start:start + count]
            start += count
        with autocast_for(self.device, self.precision):
            outputs = self.model(input_ids=input_ids.flatten(0, 1).to(self.device), pixel_values=pixel_values,
                                 attention_mask=attention_mask.flatten(0, 1).to(self.device))
        self.images_encoded += len(requests)
        for row, request in enumerate(requests):  # for exemplar prompts on the same image
            if request.image_key and self.cache.max_bytes:
                self.cache.put(request.image_key, self._feature_entry(outputs.image_embeds, row))
        logits = outputs.logits.float().cpu()  # (images, patches, queries)
        boxes = _corners(outputs.pred_boxes.float().cpu())  # relative to the image padded to a square
        found = []
        for row, (request, count) in enumerate(zip(requests, counts)):
            best, labels = logits[row, :, :count].max(dim=-1)
            side = max(request.image.shape[:2])  # the padded square's side, in original pixels
            found.append(_detections(request, best.sigmoid(), labels, boxes[row] * side))
        return found

    def _owlv2_exemplars(self, request: DetectionRequest) -> Detections:
        from torchvision.ops import nms

        model = self.model
        texts = [i for i, phrase in enumerate(request.phrases) if phrase]
        crops = [_crop(request.image, box) for box in request.exemplar_boxes]
        query_pixels = self.processor(query_images=crops, return_tensors="pt")["query_pixel_values"].to(self.device)
        [entry], _ = self.cache.lookup_or_encode([request.image], [request.image_key], self._owlv2_features)
        feature_map = entry.embedding.to(self.device)
        with autocast_for(self.device, self.precision):
            if texts:  # the text model alone, as the model's forward runs it; the image side is the cached map
                text = self._tokenize([request.phrases[i] for i in texts])
                text_embeds = model.owlv2.get_text_features(input_ids=text["input_ids"].to(self.device),
                                                            attention_mask=text["attention_mask"].to(self.device))
                text_embeds = text_embeds.pooler_output
                text_embeds = text_embeds / torch.linalg.norm(text_embeds, ord=2, dim=-1, keepdim=True)
            else:
                text_embeds = feature_map.new_zeros((0, model.class_head.dense0.out_features))
            image_feats = feature_map.flatten(1, 2)
            boxes = model.box_predictor(image_feats, feature_map)
            query_map = model.image_embedder(pixel_values=query_pixels)[0]
            crop_embeds = model.embed_image_query(query_map.flatten(1, 2), query_map)[0][:, 0]
            queries = torch.cat([text_embeds.to(crop_embeds.dtype), crop_embeds])[None]
            logits = model.class_predictor(image_feats, queries)[0][0].float().cpu()  # (patches, queries)
        labels = np.asarray(request.exemplar_labels)
        owners = np.asarray(request.exemplar_phrases)
        exemplar_threshold = request.box_threshold if request.exemplar_threshold is None else request.exemplar_threshold
        # per patch and phrase, the best score that passes its prompt's threshold: the text's box_threshold, the
        # exemplars' exemplar_threshold (image-conditioned scores are on another scale); 0 where none passes
        per_phrase = torch.zeros((logits.shape[0], len(request.phrases)))
        unmatched = torch.full((logits.shape[0],), float("-inf"))
        for phrase in range(len(request.phrases)):
            own = [len(texts) + e for e in np.flatnonzero(owners == phrase)]
            positive = [q for q in own if labels[q - len(texts)]]
            negative = [q for q in own if not labels[q - len(texts)]]
            text = logits[:, texts.index(phrase)] if phrase in texts else unmatched
            shown = logits[:, positive].max(dim=-1).values if positive else unmatched
            best = torch.maximum(text, shown)
            score = torch.maximum(torch.where(text.sigmoid() > request.box_threshold, text.sigmoid(), 0.0),
                                  torch.where(shown.sigmoid() > exemplar_threshold, shown.sigmoid(), 0.0))
            if negative:  # more like one of the phrase's negatives than like its positives: not this phrase
                score = torch.where(logits[:, negative].max(dim=-1).values > best, 0.0, score)
            per_phrase[:, phrase] = score
        scores, phrase_ids = per_phrase.max(dim=-1)
        side = max(request.image.shape[:2])  # boxes are relative to the image padded to a square
        corners = _corners(boxes[0].float().cpu()) * side
        kept = nms(corners, scores, EXEMPLAR_NMS_THRESHOLD)
        dropped = torch.ones_like(scores, dtype=torch.bool)
        dropped[kept] = False
        return _detections(request, torch.where(dropped, torch.zeros_like(scores), scores), phrase_ids, corners,
                           threshold=0.0)  # each prompt's own threshold is applied above

    def _owlv2_features(self, images: list[np.ndarray]) -> list[CachedEmbedding]:
        """OWLv2's feature map of each image (its image_embedder: the vision encoder and the class-token merge)."""
        self.images_encoded += len(images)
        pixels = self.image_processor(images=[Image.fromarray(image) for image in images],
                                      return_tensors="pt")["pixel_values"].to(self.device)
        with autocast_for(self.device, self.precision):
            feature_map = self.model.image_embedder(pixel_values=pixels)[0]
        return [self._feature_entry(feature_map, row) for row in range(len(images))]

    def _feature_entry(self, feature_map: torch.Tensor, row: int) -> CachedEmbedding:
        side = int(self.model.config.vision_config.image_size)
        return CachedEmbedding(own_row(feature_map, row), (side, side), encoder_size=side)

    def _omdet_turbo(self, requests: list[DetectionRequest], pixel_values: torch.Tensor) -> list[Detections]:
        from torchvision.ops import batched_nms

        labels_per_image = [list(r.phrases) for r in requests]
        # OmDetTurboProcessor's default task, the one its model card uses
        tasks = self._tokenize([f"Detect {', '.join(labels)}." for labels in labels_per_image])
        classes = self._tokenize([label for labels in labels_per_image for label in labels])
        inputs = {
            "tasks_input_ids": tasks["input_ids"], "tasks_attention_mask": tasks["attention_mask"],
            "classes_input_ids": classes["input_ids"], "classes_attention_mask": classes["attention_mask"],
            "classes_structure": torch.tensor([len(labels) for labels in labels_per_image], dtype=torch.long),
        }
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        with autocast_for(self.device, self.precision):
            outputs = self.model(pixel_values=pixel_values, **inputs)
        logits = outputs.decoder_class_logits.float().cpu()  # (images, decoder queries, labels)
        boxes = _corners(outputs.decoder_coord_logits.float().cpu())  # relative to the image
        found = []
        for row, request in enumerate(requests):
            count = len(request.phrases)
            height, width = request.image.shape[:2]
            scores = logits[row, :, :count].sigmoid().flatten()  # (query, label) pairs, query-major
            labels = torch.arange(count).repeat(logits.shape[1])
            pixel_boxes = (boxes[row] * torch.tensor([width, height, width, height])).repeat_interleave(count, dim=0)
            keep = torch.nonzero(scores > request.box_threshold).flatten()
            keep = keep[batched_nms(pixel_boxes[keep], scores[keep], labels[keep], OMDET_NMS_THRESHOLD)]
            found.append(_detections(request, scores[keep], labels[keep], pixel_boxes[keep]))
        return found
