"""Checkpoint directories of the null models (serve_app.models.null_models): a config.json each, no weights."""

from __future__ import annotations

import json
from pathlib import Path


def make_null_models(out_dir: str | Path, boxes: int = 20) -> dict[str, Path]:
    out_dir = Path(out_dir)
    made = {}
    for name, config in (("null_detector", {"model_type": "grounded-serve-null-detector", "boxes": boxes}),
                         ("null_segmenter", {"model_type": "grounded-serve-null-segmenter"})):
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        (out_dir / name / "config.json").write_text(json.dumps(config))
        made[name] = out_dir / name
    return made
