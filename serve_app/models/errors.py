"""Model loading errors, importable without torch (the `grounded-serve download` command uses them)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be had (missing, unreadable, wrong hash) or does not fit its architecture."""


class ModelLoadError(RuntimeError):
    """A detector model cannot be loaded; the message names the setting to fix."""
