"""Every model family the service serves, as data: which roles it plays, which class loads it, its licence, an
example checkpoint and what the settings mean for it. No torch or transformers here: the app builder, the
`check` command and the docs test read it without loading a model.

A family is found by its checkpoint's `config.json` `model_type` (serve_app.models.loading reads it, once), or,
for segment-anything's own `.pth` files, by the file. Adding a family is one row here, its module and its tests
(and its line in docs/models.md, which tests/test_catalog.py checks against these rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Roles a family can play in the graph
DETECTOR = "detector"  # text -> boxes (DETECTOR_MODEL)
CONCEPT = "concept"  # text -> boxes and masks in one model, and clicks on the same image (DETECTOR_MODEL, SAM 3)
SEGMENTER = "segmenter"  # boxes and clicks -> masks (SEGMENTER_MODEL, USE_SAM, USE_MOBILE_SAM)
TRACKER = "tracker"  # a box on a video frame -> that object on the next frames (TRACKER_MODEL)
ROLES = (DETECTOR, CONCEPT, SEGMENTER, TRACKER)

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
# Official download locations of segment-anything's checkpoints (segment-anything README, MobileSAM repository).
OFFICIAL_CHECKPOINTS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_t": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
}
# The pseudo model_type of a segment-anything state dict (.pth), which has no config.json
SEGMENT_ANYTHING = "segment-anything"

_QUERY_THRESHOLDS = {"TEXT_THRESHOLD": "ignored: one query per label, no phrase-token score"}


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    name: str  # what the docs and error messages call it
    roles: tuple[str, ...]
    loader: str  # "module:Class" whose from_spec(spec, family) loads a checkpoint of it
    licence: str
    example: str  # a checkpoint of it (hub id, or URL for .pth files)
    # setting -> what it means for this family, where that differs from the README's description
    settings: Mapping[str, str] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)  # what the loader needs to know beyond the class
    # when config.json cannot be read where the graph is planned (offline, gated), a hub id whose last part holds
    # one of these names this family
    name_hints: tuple[str, ...] = ()
    # takes visual exemplars as prompts: boxes drawn on the image meaning "more like this" / "not this"
    exemplars: bool = False
    # role -> "module:Class" for a role another class plays (a video model's tracker); `loader` plays the rest
    role_loaders: Mapping[str, str] = field(default_factory=dict)

    def loader_for(self, role: str) -> str:
        return self.role_loaders.get(role, self.loader)


def _sam_family(model_type: str, name: str, model_class: str, processor: str, *, padded: bool, example: str,
                licence: str = "Apache-2.0", video_model_class: str = "") -> Family:
    # SAM and SAM-HQ keep the aspect ratio and pad to a square; SAM 2 and EdgeTAM stretch. A video model's
    # checkpoint also tracks objects through videos (serve_app.models.video_tracker)
    details = {"model_class": model_class, "processor_class": processor, "padded": padded}
    if not video_model_class:
        return Family(model_type, name, (SEGMENTER,), "serve_app.models.hf_segmenter:HfSamSegmenter", licence,
                      example, details=details)
    return Family(model_type, name, (SEGMENTER, TRACKER), "serve_app.models.hf_segmenter:HfSamSegmenter", licence,
                  example, details={**details, "video_model_class": video_model_class,
                                    "video_processor_class": "Sam2VideoProcessor"},
                  role_loaders={TRACKER: "serve_app.models.video_tracker:VideoTracker"})


FAMILIES: tuple[Family, ...] = (
    Family("grounding-dino", "Grounding DINO", (DETECTOR,), "serve_app.models.grounding_dino:GroundingDinoDetector",
           "Apache-2.0", DEFAULT_DETECTOR),
    Family("mm-grounding-dino", "MM Grounding DINO / LLMDet", (DETECTOR,),
           "serve_app.models.grounding_dino:GroundingDinoDetector", "Apache-2.0",
           "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg"),
    Family("owlv2", "OWLv2", (DETECTOR,), "serve_app.models.query_detectors:QueryDetector", "Apache-2.0",
           "google/owlv2-base-patch16-ensemble", settings=_QUERY_THRESHOLDS, exemplars=True),
    Family("omdet-turbo", "OmDet-Turbo", (DETECTOR,), "serve_app.models.query_detectors:QueryDetector", "Apache-2.0",
           "omlab/omdet-turbo-swin-tiny-hf", settings=_QUERY_THRESHOLDS),
    Family("sam3", "SAM 3 (detector only)", (CONCEPT,), "serve_app.models.sam3_concept:Sam3Concept",
           "SAM License (Meta)", "facebook/sam3", details={"interactive": False}, name_hints=("sam3",), exemplars=True,
           settings={"TEXT_THRESHOLD": "ignored: each phrase is its own prompt",
                     "BOX_THRESHOLD": "SAM 3's score threshold (detection score x presence score)"}),
    # as TRACKER_MODEL it is the video `concept` pipeline: SAM 3's video model detects and tracks each phrase
    Family("sam3_video", "SAM 3 (detector and interactive tracker)", (CONCEPT, TRACKER),
           "serve_app.models.sam3_concept:Sam3Concept", "SAM License (Meta)", "facebook/sam3",
           details={"interactive": True, "tracker_detects": True}, name_hints=("sam3",), exemplars=True,
           role_loaders={TRACKER: "serve_app.models.sam3_video_tracker:Sam3VideoTracker"},
           settings={"TEXT_THRESHOLD": "ignored: each phrase is its own prompt",
                     "BOX_THRESHOLD": "SAM 3's score threshold (detection score x presence score)"}),
    # The hub's SAM 2.1 and EdgeTAM checkpoints are saved as their video models (`sam2_video`, `edgetam_video`);
    # the image model loads from them and ignores the memory weights.
    _sam_family("sam2", "SAM 2 / 2.1", "Sam2Model", "Sam2Processor", padded=False,
                example="facebook/sam2.1-hiera-large"),
    _sam_family("sam2_video", "SAM 2 / 2.1", "Sam2Model", "Sam2Processor", padded=False,
                example="facebook/sam2.1-hiera-large", video_model_class="Sam2VideoModel"),
    _sam_family("edgetam", "EdgeTAM", "EdgeTamModel", "Sam2Processor", padded=False, example="yonigozlan/EdgeTAM-hf"),
    _sam_family("edgetam_video", "EdgeTAM", "EdgeTamModel", "Sam2Processor", padded=False,
                example="yonigozlan/EdgeTAM-hf", video_model_class="EdgeTamVideoModel"),
    _sam_family("sam_hq", "SAM-HQ", "SamHQModel", "SamHQProcessor", padded=True,
                example="syscv-community/sam-hq-vit-base"),
    _sam_family("sam", "SAM", "SamModel", "SamProcessor", padded=True, example="facebook/sam-vit-base"),
    # Models that cost nothing, for measuring the service itself (benchmarks/null_ceiling.py)
    Family("grounded-serve-null-detector", "Null detector (benchmarks)", (DETECTOR,),
           "serve_app.models.null_models:NullDetector", "Apache-2.0", "serve_app.tiny_models.null",
           settings={"TEXT_THRESHOLD": "ignored", "BOX_THRESHOLD": "ignored: config.json's boxes per image"}),
    Family("grounded-serve-null-segmenter", "Null segmenter (benchmarks)", (SEGMENTER,),
           "serve_app.models.null_models:NullSegmenter", "Apache-2.0", "serve_app.tiny_models.null"),
    Family(SEGMENT_ANYTHING, "SAM / MobileSAM (segment-anything .pth)", (SEGMENTER,),
           "serve_app.models.segmenter:SamSegmenter", "Apache-2.0", OFFICIAL_CHECKPOINTS["vit_h"],
           details={"official_checkpoints": OFFICIAL_CHECKPOINTS}),
)

_BY_TYPE = {family.model_type: family for family in FAMILIES}
assert len(_BY_TYPE) == len(FAMILIES), "one row per model_type"


def family(model_type: str) -> Family | None:
    return _BY_TYPE.get(model_type)


def families_for(role: str) -> list[Family]:
    return [f for f in FAMILIES if role in f.roles]


def served(roles: tuple[str, ...]) -> str:
    """"Grounding DINO (grounding-dino), OWLv2 (owlv2), ..." for error messages: the families that play `roles`."""
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES if set(roles) & set(f.roles))


def family_by_name_hint(checkpoint: str, role: str = "") -> Family | None:
    """The family a hub id names (facebook/sam3) when its config.json cannot be read here: the first that plays
    `role`, when one is given."""
    last = checkpoint.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "").replace("_", "")
    return next((f for f in FAMILIES if any(hint in last for hint in f.name_hints) and (not role or role in f.roles)),
                None)
