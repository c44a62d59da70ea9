"""Model sets for the benchmarks, as environment variables for the service and the in-process pipeline.

- `tiny`: the tests' tiny random-weight models (milliseconds per image: the service's own costs show).
- `full-vit_t` / `full-vit_b`: full-size architectures with random weights, saved in the official formats:
  Grounding DINO's default configuration (grounding-dino-tiny's layout, 800-1333 px input) plus MobileSAM
  (the shared fixture's synthetic weights) or SAM ViT-B. Compute per image is the real models'; outputs
  are noise. Built once and cached in .cache/bench-models (about 1.2 GB).
"""

from __future__ import annotations

from pathlib import Path

import torch

from serve_app.models.tiny import make_tiny_grounding_dino, make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-models"
MODEL_SETS = ("tiny", "full-vit_t", "full-vit_b")


def _full_size_dino() -> Path:
    out = CACHE / "grounding-dino-default-random"
    if not (out / "config.json").exists():
        make_tiny_grounding_dino(out, full_size=True)
    return out


def _sam_checkpoint(model_type: str) -> Path:
    out = CACHE / f"sam-{model_type}-random.pth"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        if model_type == "vit_t":
            from tests.mobile_sam_weights import save_mobile_sam_checkpoint

            save_mobile_sam_checkpoint(out)
        else:
            from segment_anything import sam_model_registry

            torch.manual_seed(0)
            torch.save(sam_model_registry[model_type](checkpoint=None).state_dict(), out)
    return out


def model_env(model_set: str) -> dict[str, str]:
    if model_set == "tiny":
        models = make_tiny_models(CACHE / "tiny")
        return {"GROUNDING_DINO_MODEL": str(models["grounding_dino"]), "USE_SAM": "true",
                "SAM_CHECKPOINT": str(models["sam"])}
    if model_set in ("full-vit_t", "full-vit_b"):
        sam_type = model_set.split("-", 1)[1]
        env = {"GROUNDING_DINO_MODEL": str(_full_size_dino())}
        if sam_type == "vit_t":
            return {**env, "USE_MOBILE_SAM": "true", "MOBILESAM_CHECKPOINT": str(_sam_checkpoint(sam_type))}
        return {**env, "USE_SAM": "true", "SAM_CHECKPOINT": str(_sam_checkpoint(sam_type)), "SAM_MODEL_TYPE": sam_type}
    raise ValueError(f"unknown model set {model_set!r}; expected one of {', '.join(MODEL_SETS)}")
