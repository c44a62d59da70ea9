"""Clicks and boxes an annotator draws with smart KeyPointLabels / RectangleLabels, as SAM prompts.

`serve_app.ingress.context` reads them from Label Studio's context in percent; `Clicks` holds them in
pixels of one task's image, and `click_label` decides which label the resulting mask carries.
"""

from __future__ import annotations

from dataclasses import dataclass

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
