"""Model sets for the benchmarks, as environment variables for the service and the in-process pipeline.

- `tiny`: the tests' tiny random-weight models (milliseconds per image: the service's own costs show).
- `full-vit_t` / `full-vit_b` / `full-vit_h`: full-size architectures with random weights, saved in the official
  formats: Grounding DINO's default configuration (grounding-dino-tiny's layout, 800-1333 px input) plus MobileSAM
  (the shared fixture's synthetic weights), SAM ViT-B or SAM ViT-H. Compute per image is the real models';
  outputs are noise. Built once and cached in .cache/bench-models (about 1.2 GB; ViT-H adds 2.6 GB).
- `full400-vit_t` / `full400-vit_b`: the same, with Grounding DINO's images resized to a 400 px short side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from serve_app.tiny_models.grounding_dino_sam import make_tiny_grounding_dino, make_tiny_models

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-models"
MODEL_SETS = ("tiny", "full-vit_t", "full-vit_b", "full-vit_h", "full400-vit_t", "full400-vit_b")


def _full_size_dino(short_side: int = 800) -> Path:
    """Grounding DINO's default configuration; `short_side` other than its own 800 px gets the same weights with
    the image processor resizing to that short side (and the long side in the same 800:1333 proportion)."""
    out = CACHE / "grounding-dino-default-random"
    if not (out / "config.json").exists():
        make_tiny_grounding_dino(out, full_size=True)
    if short_side == 800:
        return out
    resized = CACHE / f"grounding-dino-default-random-{short_side}"
    resized.mkdir(parents=True, exist_ok=True)
    for item in out.iterdir():
        if item.name != "processor_config.json" and not (resized / item.name).exists():
            (resized / item.name).symlink_to(item.resolve())
    config = json.loads((out / "processor_config.json").read_text())
    config["image_processor"]["size"] = {"shortest_edge": short_side, "longest_edge": round(short_side * 1333 / 800)}
    (resized / "processor_config.json").write_text(json.dumps(config, indent=2))
    return resized


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


def compact_masks(checkpoint: Path) -> Path:
    """The same random-weight SAM with masks of a trained model's size: each of the mask decoder's two up-sampling
    layers gets one weight per channel pair for its 2x2 taps (their mean), so it up-samples without the
    checkerboard noise random taps make. Compute per image is unchanged; on MobileSAM at 640x480 a mask's RLE
    falls from about 79 KB to 1.7 KB (a trained model's: about 1.4 KB) and its encoding from 1.4 to 0.2 ms
    (tests/test_compact_masks.py). The tests' tiny SAM is not compacted by it: the smoke run only runs it."""
    out = checkpoint.with_name(checkpoint.stem + "-compact.pth")
    if not out.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("mask_decoder.output_upscaling.0.weight", "mask_decoder.output_upscaling.3.weight"):
            weight = state[key]
            state[key] = weight.mean(dim=(2, 3), keepdim=True).expand_as(weight).clone()
        torch.save(state, out)
    return out


def model_env(model_set: str, masks: str = "noise") -> dict[str, str]:
    """The model set's environment; `masks="compact"`: SAM's checkpoint through compact_masks()."""
    env = _model_env(model_set)
    if masks == "compact":
        key = "MOBILESAM_CHECKPOINT" if "MOBILESAM_CHECKPOINT" in env else "SAM_CHECKPOINT"
        env[key] = str(compact_masks(Path(env[key])))
    return env


def _model_env(model_set: str) -> dict[str, str]:
    if model_set == "tiny":
        models = make_tiny_models(CACHE / "tiny")
        return {"GROUNDING_DINO_MODEL": str(models["grounding_dino"]), "USE_SAM": "true",
                "SAM_CHECKPOINT": str(models["sam"])}
    if model_set in MODEL_SETS[1:]:
        size, sam_type = model_set.split("-", 1)
        env = {"GROUNDING_DINO_MODEL": str(_full_size_dino(400 if size == "full400" else 800))}
        if sam_type == "vit_t":
            return {**env, "USE_MOBILE_SAM": "true", "MOBILESAM_CHECKPOINT": str(_sam_checkpoint(sam_type))}
        return {**env, "USE_SAM": "true", "SAM_CHECKPOINT": str(_sam_checkpoint(sam_type)), "SAM_MODEL_TYPE": sam_type}
    raise ValueError(f"unknown model set {model_set!r}; expected one of {', '.join(MODEL_SETS)}")
