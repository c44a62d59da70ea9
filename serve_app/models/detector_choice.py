"""Which class runs DETECTOR_MODEL, from the model_type in the checkpoint's config.json.

Grounding DINO and MM Grounding DINO / LLMDet read one caption and score tokens (serve_app.models.grounding_dino);
OWLv2 and OmDet-Turbo score one query per label (serve_app.models.query_detectors); SAM 3 finds every instance of
each phrase with its mask (serve_app.models.sam3_concept, the `concept` pipeline). All take the same
DetectionRequest and return the same Detections (SAM 3's with masks).
"""

from __future__ import annotations

from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.grounding_dino import FAMILIES as GROUNDING_DINO_FAMILIES
from serve_app.models.grounding_dino import GroundingDinoDetector, unserved_family
from serve_app.models.query_detectors import FAMILIES as QUERY_FAMILIES
from serve_app.models.query_detectors import QueryDetector
from serve_app.models.sam3_concept import MODEL_TYPES as CONCEPT_FAMILIES
from serve_app.models.sam3_concept import Sam3Concept


def detector_class(model_id_or_path: str) -> type:
    """The class that serves this checkpoint, or a ModelLoadError naming DETECTOR_MODEL (and the families served)."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_id_or_path).model_type
    except (OSError, ValueError) as exc:
        raise ModelLoadError(describe_load_failure(model_id_or_path, exc, "detector")) from None
    if model_type in GROUNDING_DINO_FAMILIES:
        return GroundingDinoDetector
    if model_type in QUERY_FAMILIES:
        return QueryDetector
    if model_type in CONCEPT_FAMILIES:
        return Sam3Concept
    raise unserved_family(model_id_or_path, model_type)


def load_detector(model_id_or_path: str, *, device: str = "auto", precision: str = "fp32",
                  cache_bytes: int = 0) -> GroundingDinoDetector | QueryDetector | Sam3Concept:
    """`cache_bytes` bounds SAM 3's cache of image features (clicks after a text prompt reuse them)."""
    chosen = detector_class(model_id_or_path)
    if chosen is Sam3Concept:
        return chosen.load(model_id_or_path, device=device, precision=precision, cache_bytes=cache_bytes)
    return chosen.load(model_id_or_path, device=device, precision=precision)
