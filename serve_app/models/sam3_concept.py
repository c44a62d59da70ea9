"""SAM 3 as a concept segmenter: phrases to boxes and masks in one model, and clicks on the same image.

Text: every phrase of a request is run against the image's vision features, which are computed once per
distinct image (in batches, cached by `image_key`), all phrases of a request in one forward (the features
broadcast to one row per phrase). Scores, boxes and masks are what `Sam3Processor.post_process_instance_segmentation`
gives (score = sigmoid(logit) * sigmoid(presence), masks = the bilinear resize of sigmoid(mask logits) to the
image, above MASK_THRESHOLD), computed only for the detections kept and one mask window at a time
(serve_app.models.mask_upsampling), never as full-size int64 maps for every query. On a GPU the kept masks are
up-sampled there instead, and come to the host as run starts when only RLE is wanted (serve_app.models.device_masks).

- BOX_THRESHOLD is SAM 3's score threshold (`DetectionRequest.box_threshold`), EXEMPLAR_THRESHOLD that of a phrase
  prompted with exemplar boxes (`exemplar_threshold`); TEXT_THRESHOLD does not apply
  (each phrase is its own prompt, so there is no phrase-token score to threshold) and is ignored.
- At most `max_detections` per request, highest score first, across all phrases. One object may match two
  phrases: both detections are kept, since they are two labels.

Clicks and boxes (`segment`) go through SAM 3's interactive tracker head, as `Sam3VideoModel` wires it: the
detector's ViT trunk output through the tracker's own neck (`tracker_neck`) into the SAM-2-style prompt encoder
and mask decoder. Those weights exist only in a `"sam3_video"` checkpoint (the hub's facebook/sam3). Their
features are computed with the detector's when an image is encoded (the neck is about 2 % of the encoder's
cost), so a click after a text prompt on the same image is a cache hit. A plain `"sam3"` checkpoint has no
tracker: `segment` refuses prompts with InteractiveUnavailable rather than guess. (SAM 3's own box prompt,
`input_boxes`, is an exemplar — "find every object like this one" — not "segment what is in this box", so it is
not a stand-in.)
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from serve_app import get_logger
from serve_app.models.compiled import compiled_encoder
from serve_app.models.device import autocast_for, effective_precision, pick_device
from serve_app.models.embedding_cache import CachedEmbedding, EmbeddingCache, own_row
from serve_app.models.catalog import CONCEPT, Family
from serve_app.models.device_masks import DeviceMasks, decode_each, to_host, upsample_on_device, wants_runs
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.mask_upsampling import upsample_masks
from serve_app.models.prompt_decoding import decode_prompts, has_points
from serve_app.models.spec import ModelSpec
from serve_app.models.messages import (
    DetectionRequest,
    Detections,
    Masks,
    PromptUnsupported,
    SegmentationRequest,
)

logger = get_logger(__name__)

MASK_THRESHOLD = 0.5  # on sigmoid(mask logits), SAM 3's post-processing default


class InteractiveUnavailable(PromptUnsupported):
    """Clicks or boxes were sent to a SAM 3 checkpoint without the interactive tracker's weights."""


class Sam3Concept:
    """A SAM 3 detector (text -> boxes + masks) with, where the checkpoint has it, its interactive tracker."""

    def __init__(self, model, processor, device: torch.device, *, tracker=None, precision: str = "fp32",
                 cache_bytes: int = 0, encoder_batch_size: int = 4, phrase_chunk: int = 0, decoder_chunk: int = 0,
                 pixels_on_device: bool | None = None, compile: str = "off"):
        self.model = model.to(device).eval()
        self.tracker = tracker.to(device).eval() if tracker is not None else None
        self.processor = processor
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.precision = effective_precision(device, precision)
        self.cache = EmbeddingCache(cache_bytes)
        self.images_encoded = 0  # encoder runs: proof for tests and metrics that a cache hit skipped it
        self.encoder_batch_size = max(1, encoder_batch_size)
        # Phrases decoded at once: each holds its queries' mask logits (200 x 288² floats, 66 MB, on the real model)
        self.phrase_chunk = phrase_chunk if phrase_chunk > 0 else (4 if device.type == "cpu" else 16)
        self.decoder_chunk = decoder_chunk if decoder_chunk > 0 else (4 if device.type == "cpu" else 64)
        # as the SAM segmenters: masks up-sampled on the model's device off a CPU (the same masks either way)
        self.pixels_on_device = device.type != "cpu" if pixels_on_device is None else pixels_on_device
        # The detector's position encodings depend only on the feature maps' shape, the same for every image (all
        # are resized to one square): one batch-1 copy per model, not one per cached image.
        self._position_encoding: tuple[torch.Tensor, ...] | None = None
        self.encoder = compiled_encoder(self._vision_features, compile, device, "SAM 3 vision encoder")
        self.encoder_batch_size = self.encoder.batch_size(self.encoder_batch_size)
        self.encoder.warm_up_on(lambda: self.image_processor(images=[np.zeros((64, 64, 3), np.uint8)],
                                                             return_tensors="pt")["pixel_values"].to(device),
                                self._encode, self.encoder_batch_size)

    def _vision_features(self, pixels: torch.Tensor):
        return self.model.get_vision_features(pixel_values=pixels)

    def _encode(self, pixels: torch.Tensor):
        with autocast_for(self.device, self.precision):
            return self.encoder(pixels)

    @property
    def interactive(self) -> bool:
        return self.tracker is not None

    @classmethod
    def load(cls, model_id_or_path: str, *, device: str = "auto", precision: str = "fp32",
             cache_bytes: int = 0) -> Sam3Concept:
        """From a hub id (cached under HF_HOME; HF_HUB_OFFLINE=1 uses only the cache) or a local directory holding
        a `"sam3"` (detector) or `"sam3_video"` (detector and tracker, as facebook/sam3) checkpoint."""
        from serve_app.models.loading import load_as

        return load_as(cls, ModelSpec(CONCEPT, model_id_or_path, device=device, precision=precision,
                                      cache_bytes=cache_bytes))

    @classmethod
    def from_spec(cls, spec: ModelSpec, family: Family) -> Sam3Concept:
        import transformers

        torch_device = pick_device(spec.device)
        model_id_or_path, interactive = spec.checkpoint, bool(family.details.get("interactive"))
        try:
            logger.info("loading %s from %s on %s", family.name, model_id_or_path, torch_device)
            processor = transformers.Sam3Processor.from_pretrained(model_id_or_path)
            model_class = transformers.Sam3VideoModel if interactive else transformers.Sam3Model
            loaded, loading = model_class.from_pretrained(model_id_or_path, output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(describe_load_failure(model_id_or_path, exc, "SAM 3", spec.setting)) from None
        if loading.get("missing_keys"):  # they would be random: refuse rather than serve noise
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"{spec.setting}={model_id_or_path!r}: the checkpoint lacks {len(missing)} of "
                                 f"{model_class.__name__}'s weights (for example {', '.join(missing[:3])})")
        if interactive:
            model, tracker = loaded.detector_model, _tracker_from_video_model(loaded)
        else:
            model, tracker = loaded, None
            logger.info("DETECTOR_MODEL=%s is a detector-only SAM 3 checkpoint: text prompts only; clicks and boxes "
                        "need the sam3_video checkpoint (facebook/sam3), which holds the interactive tracker",
                        model_id_or_path)
        return cls(model, processor, torch_device, tracker=tracker, precision=spec.precision,
                   cache_bytes=spec.cache_bytes, compile=spec.compile)

    # ---- vision features, once per image ----

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> list[CachedEmbedding]:
        """One cache entry per image: the detector's feature maps (and the tracker's, when there is one), each a
        copy of that image's row, so an entry's bytes are what it keeps alive."""
        self.images_encoded += len(images)
        entries = []
        for start in range(0, len(images), self.encoder_batch_size):
            chunk = images[start:start + self.encoder_batch_size]
            pixels = self.image_processor(images=list(chunk), return_tensors="pt")["pixel_values"].to(self.device)
            vision = self._encode(pixels)
            with autocast_for(self.device, self.precision):
                tracker_maps = self._tracker_features(vision.last_hidden_state) if self.tracker is not None else None
            if self._position_encoding is None:
                self._position_encoding = tuple(own_row(t, 0) for t in vision.fpn_position_encoding[:-1])
            side = int(pixels.shape[-1])
            for row in range(len(chunk)):
                embedding = {"detector": [own_row(t, row) for t in vision.fpn_hidden_states[:-1]]}
                if tracker_maps is not None:
                    embedding["tracker"] = [own_row(t, row) for t in tracker_maps]
                entries.append(CachedEmbedding(embedding, (side, side), encoder_size=side))
        return entries

    def _tracker_features(self, trunk: torch.Tensor) -> list[torch.Tensor]:
        """The ViT trunk's tokens -> the tracker's image embeddings, as Sam3VideoModel.get_vision_features_for_tracker
        and Sam3TrackerModel.get_image_embeddings make them (finest first, the coarsest with no-memory added)."""
        tracker = self.tracker
        batch = trunk.shape[0]
        height, width = tracker.prompt_encoder.image_embedding_size
        spatial = trunk.view(batch, height, width, -1).permute(0, 3, 1, 2)
        fpn, _ = tracker.vision_encoder.neck(spatial)
        maps = list(fpn[:len(tracker.backbone_feature_sizes)])
        maps[0] = tracker.mask_decoder.conv_s0(maps[0])
        maps[1] = tracker.mask_decoder.conv_s1(maps[1])
        maps[-1] = maps[-1] + tracker.no_memory_embedding.view(1, -1, 1, 1)
        return maps

    # ---- text prompts ----

    @torch.inference_mode()
    def detect(self, requests: list[DetectionRequest]) -> list[Detections]:
        """Every phrase of each request against its image: boxes, scores, phrase_ids and masks in one call."""
        results = [Detections(masks=np.zeros((0, *r.image.shape[:2]), bool)) for r in requests]
        active = [i for i, r in enumerate(requests) if r.phrases and r.max_detections > 0]
        if not active:
            return results
        entries, _ = self.cache.lookup_or_encode([requests[i].image for i in active],
                                                       [requests[i].image_key for i in active], self.embed)
        for i, entry in zip(active, entries):
            results[i] = self._detect_one(requests[i], entry)
        return results

    def _detect_one(self, request: DetectionRequest, entry: CachedEmbedding) -> Detections:
        height, width = request.image.shape[:2]
        scale = torch.tensor([width, height, width, height])
        limit = int(request.max_detections)
        # Phrases with exemplars run apart from text-only ones: a geometry prompt changes what a row attends to, so
        # a text-only phrase gives the same result whether or not it shares a request with exemplars
        with_boxes = [i for i in range(len(request.phrases)) if len(request.exemplars_of(i)[0])]
        text_only = [i for i in range(len(request.phrases)) if i not in with_boxes]
        # the best `limit` detections so far, across phrases: scores, boxes, phrase ids, low-resolution mask logits
        kept = (torch.zeros(0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None)
        exemplar_threshold = request.box_threshold if request.exemplar_threshold is None else request.exemplar_threshold
        for group, threshold in ((text_only, request.box_threshold), (with_boxes, exemplar_threshold)):
            for start in range(0, len(group), self.phrase_chunk):
                rows = group[start:start + self.phrase_chunk]
                out = self._prompt_rows(request, entry, rows)
                scores = out.pred_logits.float().sigmoid()
                if out.presence_logits is not None:
                    scores = scores * out.presence_logits.float().sigmoid()
                scores = scores.cpu()
                row_index, query_index = (scores > threshold).nonzero(as_tuple=True)
                chunk_masks = out.pred_masks[row_index.to(self.device), query_index.to(self.device)].float()
                candidates = (scores[row_index, query_index],
                              out.pred_boxes.float().cpu()[row_index, query_index] * scale,
                              torch.tensor(rows, dtype=torch.long)[row_index], chunk_masks)
                del out  # the chunk's mask logits for every query
                if kept[3] is not None:
                    candidates = tuple(torch.cat([a, b.to(a.device)]) for a, b in zip(kept, candidates))
                # phrase order before the stable sort: equal scores keep the lower phrase, then query, first
                order = torch.argsort(candidates[2], stable=True)
                candidates = tuple(t[order.to(t.device)] for t in candidates)
                best = torch.argsort(candidates[0], descending=True, stable=True)[:limit]
                kept = tuple(t[best.to(t.device)] for t in candidates)
        scores, boxes, phrase_ids, low_res = kept
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        found = Detections(boxes=boxes.numpy().astype(np.float32), scores=scores.numpy().astype(np.float32),
                           phrase_ids=phrase_ids.numpy().astype(np.int64), masks=np.zeros((0, height, width), bool))
        if low_res is None or not len(low_res):
            return found
        low_res = low_res.sigmoid()
        if not self.pixels_on_device:
            found.masks = upsample_masks(low_res, low_res.shape[-2:], (height, width), low_res.shape[-1],
                                         threshold=MASK_THRESHOLD)
            return found
        masks = upsample_on_device(low_res, low_res.shape[-2:], (height, width), low_res.shape[-1],
                                   threshold=MASK_THRESHOLD)
        [copied] = to_host([DeviceMasks(masks, torch.as_tensor(found.scores), as_runs=wants_runs(request))])
        if copied.runs is None:
            found.masks = copied.masks
        else:  # the replica writes the RLE from them (serve_app.deployments.detector), as from pixels
            found.masks, found.encoded = None, copied
        return found

    def _prompt_rows(self, request: DetectionRequest, entry: CachedEmbedding, rows: list[int]):
        """One forward for phrases `rows` of the request on its cached image features: each phrase's text and, where
        it has them, its exemplar boxes (normalised cx, cy, w, h, padded with label -10 as Sam3Processor pads)."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        height, width = request.image.shape[:2]
        # a phrase with exemplars only is the processor's "visual" prompt
        texts = [request.phrases[i] or "visual" for i in rows]
        text = self.processor(text=texts, return_tensors="pt")
        n = len(rows)
        vision = Sam3VisionEncoderOutput(  # broadcast views: one row per phrase, no copy
            fpn_hidden_states=(*(t.expand(n, *t.shape[1:]) for t in entry.embedding["detector"]), None),
            fpn_position_encoding=(*(t.expand(n, *t.shape[1:]) for t in self._position_encoding), None),
        )
        geometry = {}
        exemplars = [request.exemplars_of(i) for i in rows]
        most = max(len(boxes) for boxes, _ in exemplars)
        if most:
            boxes = torch.zeros(n, most, 4)
            labels = torch.full((n, most), -10, dtype=torch.long)
            size = torch.tensor([width, height, width, height], dtype=torch.float32)
            for row, (xyxy, positive) in enumerate(exemplars):
                corners = torch.as_tensor(xyxy, dtype=torch.float32) / size
                boxes[row, :len(xyxy)] = torch.stack([(corners[:, 0] + corners[:, 2]) / 2,
                                                      (corners[:, 1] + corners[:, 3]) / 2,
                                                      corners[:, 2] - corners[:, 0], corners[:, 3] - corners[:, 1]], -1)
                labels[row, :len(xyxy)] = torch.as_tensor(positive, dtype=torch.long)
            geometry = {"input_boxes": boxes.to(self.device), "input_boxes_labels": labels.to(self.device)}
        with autocast_for(self.device, self.precision):
            return self.model(vision_embeds=vision, input_ids=text["input_ids"].to(self.device),
                              attention_mask=text["attention_mask"].to(self.device), **geometry)

    # ---- clicks and boxes ----

    @torch.inference_mode()
    def segment(self, requests: list[SegmentationRequest]) -> list[Masks]:
        """As the SAM segmenters: without points one mask per box; with points one mask from all points and the
        first box. Raises InteractiveUnavailable when the checkpoint has no tracker."""
        results = [Masks(masks=np.zeros((0, *r.image.shape[:2]), bool)) for r in requests]
        active = [i for i, r in enumerate(requests) if len(r.boxes) or has_points(r)]
        if not active:
            return results
        if self.tracker is None:
            raise InteractiveUnavailable(
                "this SAM 3 checkpoint (model_type 'sam3') holds the text-prompted detector only; clicks and boxes "
                "need the interactive tracker's weights, which the 'sam3_video' checkpoint (facebook/sam3) has: "
                "set DETECTOR_MODEL to that")
        entries, encoded_now = self.cache.lookup_or_encode(
            [requests[i].image for i in active], [requests[i].image_key for i in active], self.embed)
        return decode_each(requests, active, entries, encoded_now, lambda request, entry: decode_prompts(
            request, entry, self._run_tracker, self._upsample, chunk=self.decoder_chunk, device=self.device,
            on_device=self.pixels_on_device))

    def _run_tracker(self, entry: CachedEmbedding, *, points=None, labels=None, boxes=None, multimask=False):
        with autocast_for(self.device, self.precision):
            out = self.tracker(image_embeddings=list(entry.embedding["tracker"]), input_points=points,
                               input_labels=labels, input_boxes=boxes, multimask_output=multimask)
        return out.pred_masks, out.iou_scores

    def _upsample(self, low_res: torch.Tensor, entry: CachedEmbedding, original_size) -> np.ndarray | torch.Tensor:
        side = low_res.shape[-1]  # the tracker's processor resizes the logits straight to the image, above 0
        upsample = upsample_on_device if self.pixels_on_device else upsample_masks
        return upsample(low_res.float(), (side, side), original_size, side)


def _tracker_from_video_model(video):
    """A Sam3TrackerModel made of a loaded Sam3VideoModel's own tensors (no copy): the tracker's prompt encoder and
    mask decoder, its neck (`tracker_neck`) and the detector's ViT trunk, which the hub checkpoint shares. Built
    here because Sam3TrackerModel.from_pretrained on a sam3_video checkpoint leaves the `tracker_model.` weights
    unloaded in transformers 5.24, and would load a second copy of the ViT."""
    from transformers import Sam3TrackerModel

    with torch.device("meta"):
        tracker = Sam3TrackerModel(copy.deepcopy(video.config))
    # the modules themselves (their non-persistent buffers too), shared with the loaded model
    tracker.vision_encoder.backbone = video.detector_model.vision_encoder.backbone
    tracker.vision_encoder.neck = video.tracker_neck
    own = video.tracker_model.state_dict()
    wanted = [k for k in tracker.state_dict() if not k.startswith("vision_encoder.")]
    missing = [k for k in wanted if k not in own]
    if missing:
        raise ModelLoadError(f"DETECTOR_MODEL: the sam3_video checkpoint's tracker lacks {len(missing)} weights "
                             f"(for example {', '.join(missing[:3])})")
    tracker.load_state_dict({k: own[k] for k in wanted}, strict=False, assign=True)
    grid = video.detector_model.config.vision_config.backbone_config
    grid = (grid.image_size // grid.patch_size,) * 2
    if tuple(tracker.prompt_encoder.image_embedding_size) != grid:
        raise ModelLoadError(f"DETECTOR_MODEL: the sam3_video checkpoint's tracker expects a "
                             f"{tuple(tracker.prompt_encoder.image_embedding_size)} feature grid, its detector makes "
                             f"{grid}")
    meta = [name for name, t in [*tracker.named_parameters(), *tracker.named_buffers()] if t.is_meta]
    if meta:
        raise ModelLoadError(f"DETECTOR_MODEL: the SAM 3 tracker could not be assembled ({', '.join(meta[:3])})")
    return tracker



