"""Label Studio's `params.context`, read once per request.

The labeling UI sends what the annotator just did as `context.result`: the prompt typed into a TextArea
(`textarea`), threshold sliders (`number` results named `box_threshold` / `text_threshold`) and smart
regions drawn on the image (`keypointlabels` clicks, `rectanglelabels` boxes) in percent of the displayed
image. One walk over that list gives a `LabellingContext`; the regions become pixels per task image, since
every task may have its own size. Batch "Retrieve predictions" sends no context.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.interactive import MAX_CLICKS, Clicks
from serve_app.ingress.label_config import NEGATIVE_EXEMPLAR_LABEL, THRESHOLD_NUMBERS, ProjectConfig
from serve_app.unit_interval import unit_interval

REGION_TYPES = ("keypointlabels", "rectanglelabels")
_REGION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class DrawnRegions:
    """Clicks and the last drawn box, in percent of the image (0-100), with the label drawn with."""

    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()  # 1 positive, 0 negative (alt-click)
    box: tuple[float, float, float, float] | None = None  # x, y, width, height
    label: str | None = None

    def __bool__(self) -> bool:
        return bool(self.points) or self.box is not None

    def in_pixels(self, width: int, height: int) -> Clicks:
        """Percent of the displayed (EXIF-rotated) image times the decoded size, which is the same image."""
        points = np.array([(x / 100 * width, y / 100 * height) for x, y in self.points], np.float32).reshape(-1, 2)
        boxes = []
        if self.box is not None:
            x, y, w, h = self.box
            left, top = x / 100 * width, y / 100 * height
            boxes.append((left, top, min(width, left + w / 100 * width), min(height, top + h / 100 * height)))
        return Clicks(points=points, point_labels=np.array(self.point_labels, np.int64),
                      box=np.array(boxes, np.float32).reshape(-1, 4), label=self.label)


@dataclass(frozen=True)
class Exemplar:
    """A box drawn with the exemplar control: "more like this" (positive) or "not this", for a label."""

    box: tuple[float, float, float, float]  # x, y, width, height in percent of the image
    label: str | None  # the class label selected on it, as sent; None: only the negative marker
    positive: bool

    def in_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        x, y, w, h = self.box
        left, top = x / 100 * width, y / 100 * height
        return left, top, min(width, left + w / 100 * width), min(height, top + h / 100 * height)


@dataclass(frozen=True)
class VideoBox:
    """A box drawn on one frame of a video (a `videorectangle` region the editor sends with Auto-Annotation on):
    "track this" forward and backward from that frame. The region's first keyframe is the box."""

    region_id: str  # the editor's region id: the answer replaces that region
    frame: int  # the editor's frame number (from 1)
    box: tuple[float, float, float, float]  # x, y, width, height in percent of the frame
    label: str | None = None  # value.labels[0], when the region has one

    def in_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        x, y, w, h = self.box
        left, top = x / 100 * width, y / 100 * height
        return left, top, min(width, left + w / 100 * width), min(height, top + h / 100 * height)


@dataclass(frozen=True)
class LabellingContext:
    prompt_text: str | None = None  # None: no TextArea result, so the config's labels are the prompt
    thresholds: dict[str, float] = field(default_factory=dict)  # only those the context sets
    regions: DrawnRegions = DrawnRegions()
    exemplars: tuple[Exemplar, ...] = ()
    video_box: VideoBox | None = None  # the last video region sent: track it


def parse_context(context: Any, config: ProjectConfig, max_regions: int, max_exemplars: int = 32) -> LabellingContext:
    """One pass over `context.result`; a malformed item is a BadRequest naming it."""
    if context is None:
        return LabellingContext()
    if not isinstance(context, dict):
        raise BadRequest("params.context must be a JSON object or null")
    results = context.get("result")
    if results is None:
        return LabellingContext()
    if not isinstance(results, list):
        raise BadRequest("params.context.result must be a list")
    if len(results) > max_regions:
        raise BadRequest(f"params.context.result has {len(results)} items; the limit is {max_regions} "
                         "(MAX_CONTEXT_ITEMS)", status_code=413)
    texts: list[str] | None = None
    thresholds: dict[str, float] = {}
    points, labels, boxes, names = [], [], [], []
    video_box = None
    exemplars: dict[Any, Exemplar] = {}  # by region id: one box drawn with two controls selected is one exemplar
    for item in results:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "rectanglelabels" and config.exemplar_name and item.get("from_name") == config.exemplar_name:
            key = item.get("id") if isinstance(item.get("id"), str) else len(exemplars)
            exemplars[key] = _exemplar(item)
            if len(exemplars) > max_exemplars:
                raise BadRequest(f"more than {max_exemplars} exemplar boxes in one request (MAX_EXEMPLARS)",
                                 status_code=413)
            continue
        if kind == "textarea":
            if config.prompt_name and item.get("from_name") not in (None, config.prompt_name):
                continue
            texts = (texts or []) + _prompt_texts(item)
        elif kind == "number" and item.get("from_name") in THRESHOLD_NUMBERS:
            value = item.get("value")
            number = value.get("number") if isinstance(value, dict) else None
            try:
                thresholds[item["from_name"]] = unit_interval(number, item["from_name"])
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        elif kind == "videorectangle":
            video_box = _video_box(item)
        elif kind in REGION_TYPES:
            value = item.get("value")
            if not isinstance(value, dict):
                raise BadRequest(f"a {kind} region has no value object")
            chosen = value.get(kind)
            if isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
                names.append(chosen[0])
            x, y = _percent(value, "x"), _percent(value, "y")
            if kind == "keypointlabels":
                points.append((x, y))
                labels.append(0 if item.get("is_positive") is False else 1)
            else:
                region_id = item.get("id") if isinstance(item.get("id"), str) else None
                boxes.append((region_id, (x, y, _percent(value, "width"), _percent(value, "height"))))
    if len(points) > MAX_CLICKS:
        raise BadRequest(f"{len(points)} clicks in one request; the limit is {MAX_CLICKS}")
    # the same box may also come with the region control's label selected: then it is an exemplar, not a region
    boxes = [box for region_id, box in boxes if region_id is None or region_id not in exemplars]
    regions = DrawnRegions(points=tuple(points), point_labels=tuple(labels), box=boxes[-1] if boxes else None,
                           label=names[-1] if names else None)
    return LabellingContext(prompt_text=". ".join(texts) if texts is not None else None, thresholds=thresholds,
                            regions=regions, exemplars=tuple(exemplars.values()), video_box=video_box)


def _video_box(item: dict) -> VideoBox:
    value = item.get("value")
    sequence = value.get("sequence") if isinstance(value, dict) else None
    if not isinstance(sequence, list) or not sequence or not isinstance(sequence[0], dict):
        raise BadRequest("a videorectangle region needs value.sequence with at least one keyframe")
    first = sequence[0]
    frame = first.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, int) or not 1 <= frame <= 10**9:
        raise BadRequest("a videorectangle keyframe's frame must be a whole number from 1")
    box = (_percent(first, "x"), _percent(first, "y"), _percent(first, "width"), _percent(first, "height"))
    if min(box[2], 100 - box[0]) <= 0 or min(box[3], 100 - box[1]) <= 0:
        raise BadRequest("the videorectangle's box has no area inside the frame")
    chosen = value.get("labels")
    label = chosen[0] if isinstance(chosen, list) and chosen and isinstance(chosen[0], str) else None
    # echoed back as the answer's region id: only an id shaped like the editor's (else the answer gets a new one)
    region_id = item.get("id") if isinstance(item.get("id"), str) and _REGION_ID.fullmatch(item["id"]) else ""
    return VideoBox(region_id=region_id, frame=frame, box=box, label=label)


def _exemplar(item: dict) -> Exemplar:
    value = item.get("value")
    if not isinstance(value, dict):
        raise BadRequest("an exemplar box has no value object")
    chosen = value.get("rectanglelabels")
    names = [name for name in chosen if isinstance(name, str)] if isinstance(chosen, list) else []
    negative = any(name.upper() == NEGATIVE_EXEMPLAR_LABEL for name in names)
    classes = [name for name in names if name.upper() != NEGATIVE_EXEMPLAR_LABEL]
    box = (_percent(value, "x"), _percent(value, "y"), _percent(value, "width"), _percent(value, "height"))
    x, y, w, h = box
    if min(w, 100 - x) <= 0 or min(h, 100 - y) <= 0:
        raise BadRequest(f"an exemplar box has no area inside the image (x={x:g}%, y={y:g}%, width={w:g}%, "
                         f"height={h:g}%)")
    return Exemplar(box=box, label=classes[0] if classes else None, positive=not negative)


def _prompt_texts(item: dict) -> list[str]:
    value = item.get("value") or {}
    text = value.get("text") if isinstance(value, dict) else None
    if isinstance(text, str):
        return [text]
    if isinstance(text, list):
        return [t for t in text if isinstance(t, str)]
    raise BadRequest("the prompt result's value.text must be a string or a list of strings")


def _percent(value: dict, key: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise BadRequest(f"a drawn region's value.{key} must be a number (percent), got a {type(number).__name__}")
    try:
        number = float(number)
    except OverflowError:
        raise BadRequest(f"a drawn region's value.{key} is out of range") from None
    if not math.isfinite(number):
        raise BadRequest(f"a drawn region's value.{key} must be a finite number (percent)")
    return min(100.0, max(0.0, number))
