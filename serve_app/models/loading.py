"""One way to load any served model: `load(spec)` finds the checkpoint's family in the catalog and calls that
family's class. The only reader of a checkpoint's config.json."""

from __future__ import annotations

import importlib
import json
import os

from serve_app.models import catalog
from serve_app.models.catalog import Family
from serve_app.models.checkpoints import is_checkpoint_file
from serve_app.models.errors import ModelLoadError, describe_load_failure
from serve_app.models.spec import ModelSpec

_WHAT = {catalog.DETECTOR: "detector", catalog.CONCEPT: "SAM 3", catalog.SEGMENTER: "SAM-family",
         catalog.TRACKER: "video tracker"}


def read_config(checkpoint: str) -> dict:
    """config.json of a local directory or a hub id (from the hub's cache, else one small download). Raises what
    reading it raised (OSError for a missing file, offline hub or unknown id; ValueError for bad JSON)."""
    path = os.path.join(os.path.expanduser(checkpoint), "config.json")
    if not os.path.isfile(path):
        if checkpoint.startswith((".", "/", "~")) or os.path.isdir(os.path.expanduser(checkpoint)):
            raise FileNotFoundError(f"no config.json in {checkpoint!r}")
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(checkpoint, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{checkpoint!r}'s config.json is not a JSON object")
    return config


def read_model_type(checkpoint: str) -> str:
    """config.json's model_type (read_config's errors, and ValueError when it has none)."""
    model_type = read_config(checkpoint).get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{checkpoint!r}'s config.json has no model_type")
    return model_type


def model_type_or_none(checkpoint: str) -> str | None:
    """read_model_type, or None where it cannot be read here (offline, gated, a typo): the replica reports the real
    error when it loads."""
    try:
        return read_model_type(checkpoint)
    except Exception:  # noqa: BLE001 - any reason: decided later, by name or at load
        return None


def family_for(spec: ModelSpec) -> Family:
    """The catalog's family for the spec's checkpoint, checked against its role; a ModelLoadError naming the
    setting and the families that play the role otherwise."""
    if spec.role == catalog.SEGMENTER and is_checkpoint_file(spec.checkpoint):
        return catalog.family(catalog.SEGMENT_ANYTHING)
    try:
        model_type = read_model_type(spec.checkpoint)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(describe_load_failure(spec.checkpoint, exc, _WHAT.get(spec.role, spec.role),
                                                   spec.setting)) from None
    found = catalog.family(model_type)
    wanted = (catalog.DETECTOR, catalog.CONCEPT) if spec.role in (catalog.DETECTOR, catalog.CONCEPT) else (spec.role,)
    if found is None or not set(wanted) & set(found.roles):
        what = "a family this service does not serve yet" if found is None else f"a {found.name}, not a {spec.role}"
        extra = ", and segment-anything .pth checkpoints" if spec.role == catalog.SEGMENTER else ""
        raise ModelLoadError(f"{spec.setting}={spec.checkpoint!r} is a {model_type!r} checkpoint ({what}); as "
                             f"{spec.setting} it serves {catalog.served(wanted)}{extra}")
    return found


def loader_class(found: Family, role: str = "") -> type:
    module, _, name = found.loader_for(role).partition(":")
    return getattr(importlib.import_module(module), name)


def load(spec: ModelSpec):
    """The loaded model for `spec`: a detector, a concept segmenter (SAM 3) or a segmenter, by its family."""
    found = family_for(spec)
    return loader_class(found, spec.role).from_spec(spec, found)


def load_as(cls: type, spec: ModelSpec):
    """`load(spec)` where the caller wants one class (a test or benchmark of that class): a checkpoint another
    class runs is refused, naming its family."""
    found = family_for(spec)
    if loader_class(found, spec.role) is not cls:
        raise ModelLoadError(f"{spec.setting}={spec.checkpoint!r} is a {found.name} ({found.model_type}) checkpoint, "
                             f"which another class runs, not {cls.__name__}: load it with "
                             "serve_app.models.loading.load")
    return cls.from_spec(spec, found)
