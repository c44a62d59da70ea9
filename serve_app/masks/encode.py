"""Encode masks where they are made: in the segmenter replica, not in the ingress.

A full-size mask costs the ingress CPU twice, once to unpack it and once for RLE, and that CPU is shared with
the event loop that answers /health (measured: 54 % of the ingress's CPU under 48 clients went to RLE). The
segmenter replicas scale out; the ingress does not. So an ingress asks for the encodings its label config needs
(`SegmentationRequest.encodings`) and gets them instead of the masks.
"""

from __future__ import annotations

import numpy as np

from serve_app.masks.polygons import mask_to_polygons
from serve_app.masks.rle import mask_to_rle, runs_to_rle
from serve_app.models.messages import Masks

RLE = "rle"
POLYGONS = "polygons"
ENCODINGS = frozenset({RLE, POLYGONS})


def encode_masks(masks: Masks, encodings: tuple[str, ...], polygon_tolerance_px: float = 1.0) -> Masks:
    """`masks` with the requested encodings filled in and the pixel masks dropped (only their count kept)."""
    unknown = set(encodings) - ENCODINGS
    if unknown:
        raise ValueError(f"unknown mask encodings {sorted(unknown)}")
    count = len(masks.runs) if masks.runs is not None else len(masks.masks)
    rle = polygons = None
    if RLE in encodings:
        rle = masks.rle if masks.rle is not None else [rle_of(masks, index) for index in range(count)]
    if POLYGONS in encodings:
        polygons = masks.polygons if masks.polygons is not None else \
            [polygons_of(masks, index, polygon_tolerance_px) for index in range(count)]
    return Masks(masks=np.zeros((count, 0, 0), bool), scores=masks.scores, cache_hit=masks.cache_hit, rle=rle,
                 polygons=polygons)


def rle_of(masks: Masks, index: int) -> np.ndarray:
    if masks.rle is not None:
        return masks.rle[index]
    if masks.runs is not None:
        return runs_to_rle(masks.runs[index])
    return mask_to_rle(np.asarray(masks.masks[index], bool))


def polygons_of(masks: Masks, index: int, polygon_tolerance_px: float) -> list:
    if masks.polygons is not None:
        return masks.polygons[index]
    if masks.runs is not None:
        raise ValueError("polygons need pixel masks; these masks came as runs (the request asked for RLE alone)")
    return mask_to_polygons(masks.masks[index], polygon_tolerance_px)
