"""Clicks and boxes an annotator draws with smart KeyPointLabels / RectangleLabels, as SAM prompts.

Label Studio sends the regions just drawn in `params.context.result`: `keypointlabels` with `x`, `y`
in percent of the displayed image and `is_positive` (false for alt-clicks), and `rectanglelabels` with
`x`, `y`, `width`, `height` in percent. The displayed image is the EXIF-rotated one, which is exactly
what the service decodes, so percent times the decoded size gives pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import ProjectConfig

MAX_CLICKS = 64


@dataclass(frozen=True)
class Clicks:
    points: np.ndarray  # P x 2, xy pixels
    point_labels: np.ndarray  # P, 1 positive / 0 negative
    box: np.ndarray  # 0 or 1 x 4, xyxy pixels
    label: str | None  # the label on the drawn regions, as sent

    def __bool__(self) -> bool:
        return len(self.points) > 0 or len(self.box) > 0


def _percent(value: dict, key: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise BadRequest(f"a drawn region's value.{key} must be a number (percent), got {number!r}")
    return min(100.0, max(0.0, float(number)))


def clicks_from_context(context: Any, width: int, height: int) -> Clicks:
    points, labels, boxes, names = [], [], [], []
    results = context.get("result") if isinstance(context, dict) else None
    for item in results if isinstance(results, list) else []:
        if not isinstance(item, dict) or item.get("type") not in ("keypointlabels", "rectanglelabels"):
            continue
        value = item.get("value")
        if not isinstance(value, dict):
            raise BadRequest(f"a {item['type']} region has no value object")
        chosen = value.get(item["type"])
        if isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
            names.append(chosen[0])
        x, y = _percent(value, "x") / 100 * width, _percent(value, "y") / 100 * height
        if item["type"] == "keypointlabels":
            points.append((x, y))
            labels.append(0 if item.get("is_positive") is False else 1)
        else:
            w, h = _percent(value, "width") / 100 * width, _percent(value, "height") / 100 * height
            boxes.append((x, y, min(width, x + w), min(height, y + h)))
    if len(points) > MAX_CLICKS:
        raise BadRequest(f"{len(points)} clicks in one request; the limit is {MAX_CLICKS}")
    return Clicks(
        points=np.array(points, np.float32).reshape(-1, 2),
        point_labels=np.array(labels, np.int64),
        box=np.array(boxes[-1:], np.float32).reshape(-1, 4),  # the box drawn last
        label=names[-1] if names else None,
    )


def click_label(config: ProjectConfig, name: str | None) -> str:
    """The label a click mask gets: the clicked label when a mask control has it, else the only one."""
    outputs = config.mask_outputs
    if not outputs:
        raise BadRequest("clicks need a <BrushLabels> or <PolygonLabels> tag to return a mask")
    available = {label for control in outputs for label in control.labels}
    if name is not None:
        label = config.aliases.get(name.lower(), name)
        if label in available:
            return label
    if len(available) == 1:
        return next(iter(available))
    raise BadRequest(f"the clicked label {name!r} is not a label of the mask tag (labels: {', '.join(sorted(available))})")
