"""Detections and masks to Label Studio prediction results."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from serve_app.ingress.label_config import ProjectConfig
from serve_app.ingress.prompts import Phrase
from serve_app.masks.encode import POLYGONS, RLE, polygons_of, rle_of
from serve_app.models.messages import Detections, Masks


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def mask_encodings(config: ProjectConfig) -> tuple[str, ...]:
    """What a segmenter should send back for this config (serve_app.masks.encode) instead of pixel masks."""
    return (RLE,) * bool(config.masks) + (POLYGONS,) * bool(config.polygons)


def _as_masks(masks: Masks | np.ndarray) -> Masks:
    return masks if isinstance(masks, Masks) else Masks(masks=np.asarray(masks, bool))


def mask_regions(config: ProjectConfig, label: str, masks: Masks, index: int, score: float, common: dict,
                 polygon_tolerance_px: float) -> list[dict[str, Any]]:
    """A brush region (RLE) for a BrushLabels tag and polygon regions for a PolygonLabels tag, from the
    segmenter's encodings when it sent them, else encoded here."""
    regions = []
    brush, polygons = config.masks, config.polygons
    if brush and label in brush.labels and score >= (brush.score_threshold or 0.0):
        regions.append({
            "id": _region_id(), "from_name": brush.name, "to_name": brush.to_name, "type": "brushlabels",
            "score": score, **common, "value": {"format": "rle", "rle": rle_of(masks, index), "brushlabels": [label]},
        })
    if polygons and label in polygons.labels and score >= (polygons.score_threshold or 0.0):
        for points in polygons_of(masks, index, polygon_tolerance_px):
            regions.append({
                "id": _region_id(), "from_name": polygons.name, "to_name": polygons.to_name,
                "type": "polygonlabels", "score": score, **common,
                "value": {"points": points, "closed": True, "polygonlabels": [label]},
            })
    return regions


def build_click_prediction(config: ProjectConfig, label: str, masks: Masks | np.ndarray, score: float, *,
                           width: int, height: int, model_version: str,
                           polygon_tolerance_px: float = 1.0) -> dict[str, Any]:
    """The (first) mask an annotator's clicks or box produced, with the label they drew with."""
    common = {"original_width": int(width), "original_height": int(height), "image_rotation": 0}
    masks = _as_masks(masks[None] if isinstance(masks, np.ndarray) and masks.ndim == 2 else masks)
    regions = mask_regions(config, label, masks, 0, float(score), common, polygon_tolerance_px)
    return {"result": regions, "score": float(score) if regions else 0.0, "model_version": model_version}


def build_prediction(config: ProjectConfig, phrases: tuple[Phrase, ...], detections: Detections,
                     masks: Masks | np.ndarray | None, *, width: int, height: int, model_version: str,
                     polygon_tolerance_px: float = 1.0) -> dict[str, Any]:
    """One prediction: a rectangle per detection and, when masks are given, brush and/or polygon regions.

    Each kind is emitted only for labels its control declares and scores at or above the
    control's `model_score_threshold`.
    """
    results: list[dict[str, Any]] = []
    kept_scores: list[float] = []
    masks = _as_masks(masks) if masks is not None else None
    common = {"original_width": int(width), "original_height": int(height), "image_rotation": 0}
    for i, (box, score, phrase_id) in enumerate(zip(detections.boxes, detections.scores, detections.phrase_ids)):
        label = phrases[int(phrase_id)].label
        score = float(score)
        box_control = config.boxes
        if box_control and label in box_control.labels and score >= (box_control.score_threshold or 0.0):
            x0, y0, x1, y1 = (float(v) for v in box)
            results.append({
                "id": _region_id(), "from_name": box_control.name, "to_name": box_control.to_name,
                "type": "rectanglelabels", "score": score, **common,
                "value": {
                    "x": 100.0 * x0 / width, "y": 100.0 * y0 / height,
                    "width": 100.0 * (x1 - x0) / width, "height": 100.0 * (y1 - y0) / height,
                    "rotation": 0, "rectanglelabels": [label],
                },
            })
            kept_scores.append(score)
        if masks is not None:
            regions = mask_regions(config, label, masks, i, score, common, polygon_tolerance_px)
            results.extend(regions)
            kept_scores.extend([score] * len(regions))
    return {
        "result": results,
        "score": float(np.mean(kept_scores)) if kept_scores else 0.0,
        "model_version": model_version,
    }
