"""Which class runs DETECTOR_MODEL, from the model_type in the checkpoint's config.json.

Grounding DINO and MM Grounding DINO / LLMDet read one caption and score tokens (serve_app.models.grounding_dino);
OWLv2 and OmDet-Turbo score one query per label (serve_app.models.query_detectors). Both classes take the same
DetectionRequest and return the same Detections.
"""

from __future__ import annotations

from serve_app.models.errors import ModelLoadError
from serve_app.models.grounding_dino import FAMILIES as GROUNDING_DINO_FAMILIES
from serve_app.models.grounding_dino import GroundingDinoDetector, describe_load_failure, unserved_family
from serve_app.models.query_detectors import FAMILIES as QUERY_FAMILIES
from serve_app.models.query_detectors import QueryDetector


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
    raise unserved_family(model_id_or_path, model_type)


def load_detector(model_id_or_path: str, *, device: str = "auto",
                  precision: str = "fp32") -> GroundingDinoDetector | QueryDetector:
    return detector_class(model_id_or_path).load(model_id_or_path, device=device, precision=precision)
