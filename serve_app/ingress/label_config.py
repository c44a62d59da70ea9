"""What the service needs from a project's labeling config, read with label-studio-sdk."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from serve_app.ingress.errors import BadRequest
from serve_app.unit_interval import unit_interval

BOX_CONTROL = "RectangleLabels"
MASK_CONTROL = "BrushLabels"
POLYGON_CONTROL = "PolygonLabels"
CLICK_CONTROL = "KeyPointLabels"
THRESHOLD_NUMBERS = ("box_threshold", "text_threshold", "exemplar_threshold")
EXEMPLAR_CONTROL = "exemplar"  # EXEMPLAR_CONTROL: the RectangleLabels whose boxes are exemplars, not regions
# A label of the exemplar control that makes a box a negative exemplar ("not this"), selected beside the class
# label (choice="multiple"); Label Studio's editor has no negative rectangle of its own (docs/interactive.md)
NEGATIVE_EXEMPLAR_LABEL = "NOT"


@dataclass(frozen=True)
class LabelControl:
    name: str
    to_name: str
    tag: str
    labels: tuple[str, ...]
    score_threshold: float | None  # `model_score_threshold` on the tag


@dataclass(frozen=True)
class ProjectConfig:
    image_name: str  # the Image tag's name, results point at it with to_name
    image_key: str  # the task data key the Image tag reads ($image -> image)
    boxes: LabelControl | None
    masks: LabelControl | None
    polygons: LabelControl | None  # masks are returned as polygons for this control
    prompt_name: str | None  # TextArea whose text is the prompt
    # the RectangleLabels whose boxes are exemplar prompts (EXEMPLAR_CONTROL), if the config has one
    exemplar_name: str | None = None
    # lower-cased label value or predicted value -> canonical label value
    aliases: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # from Number tags' defaultValue

    @property
    def mask_outputs(self) -> tuple[LabelControl, ...]:
        """Controls that receive masks: brush RLE and/or polygons."""
        return tuple(c for c in (self.masks, self.polygons) if c)

    @property
    def labels(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for control in (self.boxes, self.masks, self.polygons):
            if control:
                seen.update(dict.fromkeys(control.labels))
        return tuple(seen)


def _float_attr(value: str | None, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return unit_interval(value, what)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _control(tag, kind: str) -> LabelControl:
    labels = tuple(tag.labels)
    if not labels:
        raise BadRequest(f"the {kind} tag {tag.name!r} has no <Label> children")
    return LabelControl(
        name=tag.name,
        to_name=tag.to_name[0],
        tag=kind,
        labels=labels,
        score_threshold=_float_attr(tag.attr.get("model_score_threshold"),
                                    f"model_score_threshold of {tag.name!r}"),
    )


def parse_label_config(xml: object, exemplar_control: str = EXEMPLAR_CONTROL) -> ProjectConfig:
    if not isinstance(xml, str) or not xml.strip():  # before the cache: a list or dict is unhashable
        raise BadRequest("label_config is missing or not a string of XML")
    return _parse_label_config(xml, exemplar_control)


@functools.lru_cache(maxsize=64)
def _parse_label_config(xml: str, exemplar_control: str) -> ProjectConfig:
    """Parse once per distinct config; Label Studio sends the same XML with every request."""
    from label_studio_sdk.label_interface import LabelInterface

    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the sdk raises several types for malformed XML
        raise BadRequest(f"label_config is not a valid labeling config: {exc}") from None

    images = [o for o in interface.objects if o.tag == "Image"]
    if not images:
        raise BadRequest("label_config has no <Image> tag")

    def first(kind: str):  # the exemplar control's boxes are prompts, never where results go
        return next((c for c in interface.controls if c.tag == kind and c.name != exemplar_control), None)

    exemplar = next((c for c in interface.controls if c.tag == BOX_CONTROL and c.name == exemplar_control), None)

    boxes_tag, masks_tag, polygons_tag = first(BOX_CONTROL), first(MASK_CONTROL), first(POLYGON_CONTROL)
    if boxes_tag is None and masks_tag is None and polygons_tag is None:
        raise BadRequest("label_config has no <RectangleLabels>, <BrushLabels> or <PolygonLabels> tag")
    boxes = _control(boxes_tag, BOX_CONTROL) if boxes_tag else None
    masks = _control(masks_tag, MASK_CONTROL) if masks_tag else None
    polygons = _control(polygons_tag, POLYGON_CONTROL) if polygons_tag else None

    image_name = (boxes or masks or polygons).to_name
    image = next((o for o in images if o.name == image_name), images[0])
    image_key = str(image.value or "").lstrip("$")
    if not image_key:
        raise BadRequest(f"the <Image> tag {image.name!r} has no value=\"$key\"")

    aliases: dict[str, str] = {}
    for tag in (boxes_tag, masks_tag, polygons_tag):
        if tag is None:
            continue
        for value, label_tag in tag.labels_attrs.items():
            aliases.setdefault(value.lower(), value)
            predicted = label_tag.attr.get("predicted_values") or ""
            for alias in predicted.split(","):
                if alias.strip():
                    aliases.setdefault(alias.strip().lower(), value)

    thresholds = {}
    for control in interface.controls:
        if control.tag == "Number" and control.name in THRESHOLD_NUMBERS:
            value = _float_attr(control.attr.get("defaultValue"), f"<Number name={control.name!r}> defaultValue")
            if value is not None:
                thresholds[control.name] = value

    prompt = first("TextArea")
    return ProjectConfig(
        image_name=image.name,
        image_key=image_key,
        boxes=boxes,
        masks=masks,
        polygons=polygons,
        prompt_name=prompt.name if prompt else None,
        exemplar_name=exemplar.name if exemplar is not None else None,
        aliases=aliases,
        thresholds=thresholds,
    )
