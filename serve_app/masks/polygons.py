"""Masks to Label Studio polygons.

Rule: every connected part of a mask becomes its own polygon region (same label); holes are filled,
because a Label Studio polygon has no holes; parts smaller than MIN_PART_PIXELS are dropped as noise.
Outlines follow the centres of the boundary pixels and are simplified with Douglas-Peucker at
POLYGON_TOLERANCE_PX (default 1 px), then capped at MAX_POINTS by simplifying further. Points are
percentages of the image width and height, as Label Studio stores them.
"""

from __future__ import annotations

import numpy as np

MIN_PART_PIXELS = 16
MAX_POINTS = 400


def mask_to_polygons(mask: np.ndarray, tolerance_px: float = 1.0) -> list[list[list[float]]]:
    """Polygons (lists of [x%, y%] points) for the parts of a 2-D boolean mask, largest first."""
    import cv2

    height, width = mask.shape
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    parts = [c for c in contours if cv2.contourArea(c) + len(c) / 2 >= MIN_PART_PIXELS]  # area + half the rim
    parts.sort(key=cv2.contourArea, reverse=True)
    polygons = []
    for contour in parts:
        epsilon = tolerance_px
        simplified = cv2.approxPolyDP(contour, epsilon, True) if epsilon > 0 else contour
        while len(simplified) > MAX_POINTS:
            epsilon = max(epsilon, 0.5) * 1.5
            simplified = cv2.approxPolyDP(contour, epsilon, True)
        if len(simplified) < 3:
            continue
        points = simplified.reshape(-1, 2).astype(np.float64)
        polygons.append([[100.0 * x / width, 100.0 * y / height] for x, y in points])
    return polygons


def rasterize(polygons: list[list[list[float]]], width: int, height: int) -> np.ndarray:
    """The inverse, for tests and checks: fill percent polygons back into a boolean mask."""
    import cv2

    canvas = np.zeros((height, width), np.uint8)
    for polygon in polygons:
        points = np.round(np.array(polygon) / 100.0 * [width, height]).astype(np.int32)
        cv2.fillPoly(canvas, [points], 1)
    return canvas.astype(bool)
