"""What one model deployment loads, as a value: computed once from the settings by the graph plan
(serve_app.graph_plan) and handed to the deployment, the benchmarks and the tests alike."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    role: str  # serve_app.models.catalog's DETECTOR, CONCEPT or SEGMENTER
    checkpoint: str  # hub id, local directory, or a segment-anything .pth path or URL
    setting: str = "DETECTOR_MODEL"  # the setting that named the checkpoint: errors name it
    device: str = "auto"
    precision: str = "fp32"
    cache_bytes: int = 0  # image features kept for clicks on the same image (segmenters, SAM 3)
    compile: str = "off"  # COMPILE_ENCODERS: off, on or cudagraphs (serve_app.models.compiled)
    # segment-anything .pth files only
    sam_model_type: str = "auto"  # vit_h, vit_l, vit_b, vit_t (MobileSAM) or auto (from the weights)
    sha256: str = ""  # expected digest of the file
    cache_dir: str = ""  # where a URL checkpoint is kept
