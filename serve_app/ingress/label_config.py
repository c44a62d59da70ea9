"""What the service needs from a project's labeling config, read with label-studio-sdk."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

from serve_app.ingress.errors import BadRequest
from serve_app.unit_interval import unit_interval

BOX_CONTROL = "RectangleLabels"
MASK_CONTROL = "BrushLabels"
POLYGON_CONTROL = "PolygonLabels"
CLICK_CONTROL = "KeyPointLabels"
VIDEO_BOX_CONTROL = "VideoRectangle"  # box tracks on a <Video>; their labels come from a <Labels> tag
# What the editor assumes without a framerate attribute on <Video> (web/libs/editor, tags/object/Video)
DEFAULT_VIDEO_FRAMERATE = 24.0
MAX_VIDEO_FRAMERATE = 1_000.0
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
class VideoControls:
    """A video project: `<Video>` with `<VideoRectangle>` tracks labelled by a `<Labels>` tag."""

    framerate: float  # the <Video framerate> the editor numbers frames by, for every video of the project
    framerate_key: str = ""  # framerate="$fps": each task's data names its own rate (framerate is the fallback)

    def framerate_of(self, data: dict) -> float:
        """The rate the editor uses for this task, as it reads the attribute (web/libs/editor, Video.js)."""
        if not self.framerate_key:
            return self.framerate
        return framerate_value(data.get(self.framerate_key), self.framerate_key)


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
    # set for a <Video> project: image_name and image_key are then the Video tag's, `boxes` the VideoRectangle
    video: VideoControls | None = None

    @property
    def task_data_keys(self) -> tuple[str, ...]:
        """The keys of a task's data the service reads (what a queued task keeps)."""
        rate_key = self.video.framerate_key if self.video else ""
        return (self.image_key, rate_key) if rate_key else (self.image_key,)

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
        if any(o.tag == "Video" for o in interface.objects):
            return _video_config(interface)
        raise BadRequest("label_config has no <Image> or <Video> tag")

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

    aliases = _aliases(tag for tag in (boxes_tag, masks_tag, polygons_tag) if tag is not None)
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
        thresholds=_thresholds(interface),
    )


def _aliases(tags) -> dict[str, str]:
    """Lower-cased label values and their `predicted_values` -> the label value, first tag first."""
    aliases: dict[str, str] = {}
    for tag in tags:
        for value, label_tag in tag.labels_attrs.items():
            aliases.setdefault(value.lower(), value)
            for alias in (label_tag.attr.get("predicted_values") or "").split(","):
                if alias.strip():
                    aliases.setdefault(alias.strip().lower(), value)
    return aliases


def _thresholds(interface) -> dict[str, float]:
    thresholds = {}
    for control in interface.controls:
        if control.tag == "Number" and control.name in THRESHOLD_NUMBERS:
            value = _float_attr(control.attr.get("defaultValue"), f"<Number name={control.name!r}> defaultValue")
            if value is not None:
                thresholds[control.name] = value
    return thresholds


def _video_config(interface) -> ProjectConfig:
    """Label Studio's video object-tracking template: tracks go to the VideoRectangle, labels from <Labels>."""
    box = next((c for c in interface.controls if c.tag == VIDEO_BOX_CONTROL), None)
    if box is None:
        raise BadRequest("label_config has a <Video> but no <VideoRectangle> tag: tracks are returned as video "
                         "rectangles (Label Studio has no masks on video)")
    video = next((o for o in interface.objects if o.tag == "Video" and o.name == box.to_name[0]), None)
    if video is None:
        raise BadRequest(f"the <VideoRectangle> {box.name!r} points at no <Video> tag")
    key = str(video.value or "").lstrip("$")
    if not key:
        raise BadRequest(f"the <Video> tag {video.name!r} has no value=\"$key\"")
    label_tags = [c for c in interface.controls if c.tag == "Labels" and video.name in c.to_name]
    labels = tuple(dict.fromkeys(value for tag in label_tags for value in tag.labels))
    if not labels:
        raise BadRequest(f"label_config has no <Labels> with <Label> children for the <Video> {video.name!r}")
    threshold = next((_float_attr(tag.attr.get("model_score_threshold"), f"model_score_threshold of {tag.name!r}")
                      for tag in label_tags if tag.attr.get("model_score_threshold")), None)
    aliases = _aliases(label_tags)
    prompt = next((c for c in interface.controls if c.tag == "TextArea"), None)
    return ProjectConfig(
        image_name=video.name, image_key=key,
        boxes=LabelControl(name=box.name, to_name=video.name, tag=VIDEO_BOX_CONTROL, labels=labels,
                           score_threshold=threshold),
        masks=None, polygons=None, prompt_name=prompt.name if prompt else None, aliases=aliases,
        thresholds=_thresholds(interface), video=_framerate(video))


def _framerate(video) -> VideoControls:
    raw = str(video.attr.get("framerate") or "").strip()
    if raw.startswith("$"):
        return VideoControls(framerate=DEFAULT_VIDEO_FRAMERATE, framerate_key=raw[1:])
    return VideoControls(framerate=framerate_value(raw, "framerate"))


def framerate_value(raw: object, what: str) -> float:
    """The editor's reading: empty or not a number is 24; below 1 is taken as seconds per frame (1 / value)."""
    if isinstance(raw, bool) or raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_VIDEO_FRAMERATE
    try:
        rate = float(raw)
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_VIDEO_FRAMERATE
    if not math.isfinite(rate) or rate == 0:
        return DEFAULT_VIDEO_FRAMERATE
    if rate < 1:
        rate = 1 / rate if rate > 0 else float("nan")
    if not 0 < rate <= MAX_VIDEO_FRAMERATE:
        raise BadRequest(f"the <Video> {what} {raw!r} is not a frame rate (more than 0, at most "
                         f"{MAX_VIDEO_FRAMERATE:g})")
    return rate
