"""Which pipeline the graph runs, decided once when the app is built: from PIPELINE, or from the detector's family.

- `detect`: the detector's boxes only.
- `detect+segment`: the detector's boxes, then one mask per box from the segmenter (SEGMENTER_MODEL, USE_SAM,
  USE_MOBILE_SAM), which also answers clicks.
- `concept`: SAM 3 as DETECTOR_MODEL finds every instance of each phrase with its mask in one model, and answers
  clicks from the same cached image features (its tracker, in the `sam3_video` checkpoint the hub ships).

Combinations that cannot mean what they say fail `serve run` with one message naming the settings.
"""

from __future__ import annotations

import json
import os

from serve_app.settings import Settings, SettingsError

CONCEPT_TYPES = ("sam3", "sam3_video")


def detector_model_type(model: str) -> str | None:
    """config.json's model_type for a local directory or a hub id (the hub's cache, else one small download);
    None when it cannot be read here (the replica reports the real error when it loads)."""
    path = os.path.join(os.path.expanduser(model), "config.json")
    try:
        if not os.path.isfile(path):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json")
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except Exception:  # noqa: BLE001 - offline, gated (SAM 3), a typo: decided by name below, checked at load
        return None
    return model_type if isinstance(model_type, str) else None


def choose_pipeline(settings: Settings, model_type_of=detector_model_type) -> str:
    model_type = model_type_of(settings.detector_model)
    if model_type is None:  # unreadable here: a SAM 3 hub id says so in its name (facebook/sam3)
        is_sam3 = "sam3" in os.path.basename(settings.detector_model.rstrip("/")).lower().replace("-", "").replace("_", "")
    else:
        is_sam3 = model_type in CONCEPT_TYPES
    chosen = settings.pipeline
    if chosen == "auto":
        chosen = "concept" if is_sam3 else ("detect+segment" if settings.sam_enabled else "detect")
    segmenter = _segmenter_settings(settings)
    if chosen == "concept":
        if not is_sam3:
            raise SettingsError(f"PIPELINE=concept needs a SAM 3 checkpoint as DETECTOR_MODEL (facebook/sam3); "
                                f"DETECTOR_MODEL={settings.detector_model!r} is {model_type or 'not one'!r}")
        if segmenter:
            raise SettingsError(f"PIPELINE=concept segments with SAM 3 itself (DETECTOR_MODEL); unset {segmenter}")
    elif is_sam3:
        raise SettingsError(f"DETECTOR_MODEL={settings.detector_model!r} is SAM 3, which gives masks itself: set "
                            f"PIPELINE=concept (or auto), not PIPELINE={chosen}")
    elif chosen == "detect+segment" and not settings.sam_enabled:
        raise SettingsError("PIPELINE=detect+segment needs a segmenter: set SEGMENTER_MODEL (or USE_SAM / USE_MOBILE_SAM)")
    elif chosen == "detect" and segmenter:
        raise SettingsError(f"PIPELINE=detect gives boxes only, but {segmenter} asks for masks: unset it or set "
                            "PIPELINE=detect+segment")
    return chosen


def _segmenter_settings(settings: Settings) -> str:
    names = [name for name, on in (("SEGMENTER_MODEL", bool(settings.segmenter_model)), ("USE_SAM", settings.use_sam),
                                   ("USE_MOBILE_SAM", settings.use_mobile_sam)) if on]
    return " and ".join(names)
