"""Model loading errors, importable without torch (the `grounded-serve download` command uses them)."""

import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be had (missing, unreadable, wrong hash) or does not fit its architecture."""


class ModelLoadError(RuntimeError):
    """A model cannot be loaded; the message names the setting to fix."""


def describe_load_failure(model: str, exc: Exception, kind: str, setting: str = "DETECTOR_MODEL") -> str:
    """Why a transformers checkpoint (hub id or directory) did not load, naming the setting to fix. `kind`: what
    the directory should have held ("Grounding DINO", "SAM 3", ...)."""
    if os.path.isdir(model):
        where = f"the directory {model!r} is not a transformers {kind} model (config.json, weights, processor)"
    elif model.startswith((".", "/", "~")):
        where = f"{model!r} does not exist"
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        where = (f"HF_HUB_OFFLINE is set and {model!r} is not in the Hugging Face cache (HF_HOME={home}); "
                 f"download it there first or point {setting} at a local directory")
    else:
        where = f"{model!r} could not be fetched from the Hugging Face hub"
    return f"{setting}={model!r}: {where}. ({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})"
