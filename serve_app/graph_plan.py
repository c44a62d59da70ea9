"""What the deployment graph runs, decided once from the settings and the catalog when the app is built, and handed
to the deployments and the Ingress as a value: they never decide it again.

Pipelines (PIPELINE, or `auto` from the detector's family):
- `detect`: the detector's boxes only.
- `detect+segment`: the detector's boxes, then one mask per box from the segmenter (SEGMENTER_MODEL, USE_SAM,
  USE_MOBILE_SAM), which also answers clicks.
- `concept`: SAM 3 as DETECTOR_MODEL finds every instance of each phrase with its mask in one model, and answers
  clicks from the same cached image features (its tracker, in the `sam3_video` checkpoint the hub ships).

Videos (docs/video.md): `concept` when TRACKER_MODEL is SAM 3 (its video model, on a Tracker deployment, finds and
tracks each phrase), `detect+track` when it names a SAM 2.1 / EdgeTAM video checkpoint (the Tracker carries each
detected object through the frames), else `detect+link` (ByteTrack links the detector's boxes).

Combinations that cannot mean what they say fail `serve run` with one message naming the settings.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

from serve_app.models import catalog
from serve_app.models.loading import model_type_or_none
from serve_app.models.spec import ModelSpec
from serve_app.settings import Settings, SettingsError

DETECTOR_DEPLOYMENT = "Detector"
SEGMENTER_DEPLOYMENT = "Segmenter"
TRACKER_DEPLOYMENT = "Tracker"


@dataclass(frozen=True)
class ReplicaProcess:
    """How a model replica's process behaves on a CPU node (serve_app.deployments.replica_cores)."""

    cpu_niceness: int = 0  # MODEL_CPU_NICENESS
    cpu_share: int = 1  # model roles whose replicas share a CPU node's cores


@dataclass(frozen=True)
class TrackerLimits:
    """What one Tracker replica holds (serve_app.models.tracker_sessions)."""

    max_sessions: int = 8  # TRACKER_MAX_SESSIONS
    idle_s: float = 300.0  # TRACKER_SESSION_IDLE_S
    max_objects: int = 32  # TRACKER_MAX_OBJECTS
    lost_after_s: float = 2.0  # TRACKER_LOST_AFTER_S


@dataclass(frozen=True)
class GraphPlan:
    pipeline: str  # detect, detect+segment or concept
    detector: ModelSpec  # role DETECTOR, or CONCEPT for SAM 3
    segmenter: ModelSpec | None  # the Segmenter deployment's model; None: no Segmenter in the app
    process: ReplicaProcess
    model_version: str  # what Label Studio stores with each prediction
    exemplars: bool = False  # the detector takes exemplar boxes as prompts (its catalog row says so)
    tracker: ModelSpec | None = None  # the Tracker deployment's video model; None: videos are `detect+link`
    tracker_limits: TrackerLimits = TrackerLimits()
    tracker_detects: bool = False  # the tracker finds the phrases itself (SAM 3's video model)

    @property
    def video_pipeline(self) -> str:
        """concept: SAM 3's video model finds and tracks every phrase; detect+track: the detector's boxes start
        objects the video model carries; detect+link: ByteTrack links the detector's boxes."""
        if self.tracker is None:
            return "detect+link"
        return "concept" if self.tracker_detects else "detect+track"

    @property
    def concept(self) -> bool:
        return self.pipeline == "concept"

    @property
    def clicks_deployment(self) -> str | None:
        """The deployment that answers clicks and drawn boxes, and segments detections: SAM 3 answers them from
        the image features it cached for the prompt; None: no model segments."""
        if self.concept:
            return DETECTOR_DEPLOYMENT
        return SEGMENTER_DEPLOYMENT if self.segmenter is not None else None


def plan_graph(settings: Settings, model_type_of: Callable[[str], str | None] = model_type_or_none) -> GraphPlan:
    found = _detector_family(settings, model_type_of)  # config.json read once for the whole plan
    pipeline = _pipeline_for(settings, found)
    concept = pipeline == "concept"
    # SAM 3 keeps image features for clicks and exemplars, OWLv2 for exemplars after a prompt on the same image
    caches = concept or bool(found and found.exemplars)
    detector = ModelSpec(catalog.CONCEPT if concept else catalog.DETECTOR, settings.detector_model, "DETECTOR_MODEL",
                         device=settings.device, precision=settings.precision,
                         cache_bytes=settings.sam_embedding_cache_bytes if caches else 0,
                         compile=settings.compile_encoders if concept else "off")
    segmenter = None
    if settings.sam_enabled:
        segmenter = ModelSpec(catalog.SEGMENTER, settings.segmenter_checkpoint, settings.segmenter_checkpoint_setting,
                              device=settings.device, precision=settings.precision,
                              cache_bytes=settings.sam_embedding_cache_bytes, compile=settings.compile_encoders,
                              sam_model_type=settings.segmenter_model_type, sha256=settings.segmenter_checkpoint_sha256,
                              cache_dir=settings.checkpoint_cache_dir)
    tracker, tracker_detects = None, False
    if settings.tracker_model:
        tracker_found = _tracker_family(settings.tracker_model, model_type_of)
        tracker_detects = bool(tracker_found and tracker_found.details.get("tracker_detects"))
        tracker = ModelSpec(catalog.TRACKER, settings.tracker_model, "TRACKER_MODEL", device=settings.device,
                            precision=settings.precision)
    limits = TrackerLimits(settings.tracker_max_sessions, settings.tracker_session_idle_s,
                           settings.tracker_max_objects, settings.tracker_lost_after_s)
    return GraphPlan(pipeline=pipeline, detector=detector, segmenter=segmenter,
                     process=ReplicaProcess(settings.model_cpu_niceness, 2 if segmenter is not None else 1),
                     model_version=model_version_for(settings), exemplars=bool(found and found.exemplars),
                     tracker=tracker, tracker_limits=limits, tracker_detects=tracker_detects)


def _tracker_family(checkpoint: str, model_type_of: Callable[[str], str | None]) -> catalog.Family | None:
    """TRACKER_MODEL's family. One readable here and not a video model fails `serve run` now, not each video
    later; an unreadable one (offline, gated) is named by its hub id (facebook/sam3), else decided at load."""
    model_type = model_type_of(checkpoint)
    if model_type is None:
        return catalog.family_by_name_hint(checkpoint, catalog.TRACKER)
    found = catalog.family(model_type)
    if found is None or catalog.TRACKER not in found.roles:
        raise SettingsError(f"TRACKER_MODEL={checkpoint!r} is a {model_type!r} checkpoint; it must be a video model: "
                            f"{catalog.served((catalog.TRACKER,))} (the hub's facebook/sam2.1-hiera-*, "
                            "yonigozlan/EdgeTAM-hf and facebook/sam3 are)")
    return found


def _detector_family(settings: Settings, model_type_of: Callable[[str], str | None]) -> catalog.Family | None:
    model_type = model_type_of(settings.detector_model)
    if model_type is None:  # unreadable here (offline, gated): a SAM 3 hub id says so in its name (facebook/sam3)
        return catalog.family_by_name_hint(settings.detector_model)
    return catalog.family(model_type)


def choose_pipeline(settings: Settings, model_type_of: Callable[[str], str | None] = model_type_or_none) -> str:
    return _pipeline_for(settings, _detector_family(settings, model_type_of))


def _pipeline_for(settings: Settings, found: catalog.Family | None) -> str:
    concept_model = found is not None and catalog.CONCEPT in found.roles
    chosen = settings.pipeline
    if chosen == "auto":
        chosen = "concept" if concept_model else ("detect+segment" if settings.sam_enabled else "detect")
    segmenter = _segmenter_settings(settings)
    if chosen == "concept":
        if not concept_model:
            described = found.model_type if found else "not one"
            raise SettingsError(f"PIPELINE=concept needs a SAM 3 checkpoint as DETECTOR_MODEL (facebook/sam3); "
                                f"DETECTOR_MODEL={settings.detector_model!r} is {described!r}")
        if segmenter:
            raise SettingsError(f"PIPELINE=concept segments with SAM 3 itself (DETECTOR_MODEL); unset {segmenter}")
    elif concept_model:
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


def model_version_for(settings: Settings) -> str:
    """Stable name of the models: Label Studio skips tasks that have a prediction of this version."""
    if settings.model_version:
        return settings.model_version
    dino = os.path.basename(settings.detector_model.rstrip("/")) or settings.detector_model
    version = f"grounded-serve:{dino}"
    if settings.segmenter_model:
        name = os.path.basename(settings.segmenter_model.rstrip("/"))
        version += "+" + re.sub(r"\.(pth|pt)$", "", name, flags=re.IGNORECASE)  # sam2.1-hiera-large keeps its dot
    elif settings.sam_enabled:
        checkpoint = os.path.splitext(os.path.basename(settings.segmenter_checkpoint))[0]
        version += f"+{'mobile_sam' if settings.use_mobile_sam else 'sam'}:{checkpoint}"
    if settings.tracker_model:  # another tracker, other video tracks: Label Studio must not skip them as done
        version += "+track:" + (os.path.basename(settings.tracker_model.rstrip("/")) or settings.tracker_model)
    return version
