"""Per-model table: parameters, weights at fp32/fp16, CPU time per image and memory per replica, for every model
family the service serves, in its real architecture sizes with random weights (no hub here).

    python -m benchmarks.model_table [--models sam2.1-hiera-tiny,owlv2-base] [--images 2] [--device cpu]
    python -m benchmarks.model_table --device cuda --precision fp16      # on a GPU machine

Each model runs in its own process (so its peak RSS is its own), through the class a replica runs (the same
preprocessing, batching code and post-processing), on 640×480 images: one warm-up, then `--images` timed calls of
one image each. Detectors get the prompt "cats. house"; segmenters 5 boxes; SAM 3 both phrases (boxes and masks).
The time counts the whole call a replica makes (encoder, decoder, post-processing), not the HTTP around it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import machine

IMAGE_HW = (480, 640)
BOXES = np.array([[40, 30, 200, 220], [300, 100, 620, 470], [10, 10, 60, 60], [250, 250, 400, 400],
                  [0, 0, 640, 480]], np.float32)


def _hiera(hidden: int, blocks: list[int], heads: list[int], global_blocks: list[int], windows: list[int],
           background: list[int]) -> dict:
    dims = [hidden * 2 ** i for i in range(4)]
    return {"vision_config": {
        "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": hidden, "blocks_per_stage": blocks,
                            "embed_dim_per_stage": dims, "num_attention_heads_per_stage": heads,
                            "window_size_per_stage": windows, "global_attention_blocks": global_blocks,
                            "window_positional_embedding_background_size": background},
        "backbone_channel_list": dims[::-1]}}


# The sizes of the hub checkpoints (their config.json files, as published with SAM 2.1).
SAM2_SIZES = {
    "sam2.1-hiera-tiny": _hiera(96, [1, 2, 7, 2], [1, 2, 4, 8], [5, 7, 9], [8, 4, 14, 7], [7, 7]),
    "sam2.1-hiera-small": _hiera(96, [1, 2, 11, 2], [1, 2, 4, 8], [7, 10, 13], [8, 4, 14, 7], [7, 7]),
    "sam2.1-hiera-base-plus": _hiera(112, [2, 3, 16, 3], [2, 4, 8, 16], [12, 16, 20], [8, 4, 14, 7], [14, 14]),
    "sam2.1-hiera-large": _hiera(144, [2, 6, 36, 4], [2, 4, 8, 16], [23, 33, 43], [8, 4, 16, 8], [7, 7]),
}
SAM_VIT = {  # segment-anything's image encoder sizes
    "vit_b": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "global_attn_indexes": [2, 5, 8, 11]},
    "vit_h": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
              "global_attn_indexes": [7, 15, 23, 31]},
}


def build(name: str):
    """(the replica's model object, role) for one table row, random weights, real sizes."""
    import torch
    import transformers as tf

    from serve_app.models.catalog import family
    from serve_app.models.hf_segmenter import HfSamSegmenter

    device = torch.device(ARGS.device)
    if name in SAM2_SIZES:
        model = tf.Sam2Model(tf.Sam2Config(**SAM2_SIZES[name]))
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor())
        return HfSamSegmenter(model, processor, family("sam2"), device, precision=ARGS.precision), "segmenter"
    if name.startswith("sam-hq-"):
        vit = SAM_VIT[name.removeprefix("sam-hq-")]
        config = tf.SamHQConfig(vision_config=vit, mask_decoder_config={"vit_dim": vit["hidden_size"]})
        processor = tf.SamHQProcessor(image_processor=tf.SamImageProcessor())
        return HfSamSegmenter(tf.SamHQModel(config), processor, family("sam_hq"), device,
                              precision=ARGS.precision), "segmenter"
    if name == "edgetam":
        # EdgeTamConfig()'s own default misspells the backbone's `architecture` (transformers 5.24): name RepViT-M1
        repvit = tf.TimmWrapperConfig(architecture="repvit_m1",
                                      model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor())
        return HfSamSegmenter(tf.EdgeTamModel(tf.EdgeTamConfig(vision_config={"backbone_config": repvit})), processor,
                              family("edgetam"), device, precision=ARGS.precision), "segmenter"
    if name in ("grounding-dino-tiny", "mm-grounding-dino-tiny"):
        import tempfile

        from serve_app.models.grounding_dino import GroundingDinoDetector
        from serve_app.tiny_models.grounding_dino_sam import make_tiny_grounding_dino

        family = "mm-grounding-dino" if name.startswith("mm") else "grounding-dino"
        path = make_tiny_grounding_dino(tempfile.mkdtemp(), full_size=True, family=family)
        return GroundingDinoDetector.load(str(path), device=ARGS.device, precision=ARGS.precision), "detector"
    from serve_app.tiny_models.owlv2_omdet import EOS, make_tiny_clip_tokenizer

    if name == "owlv2-base-patch16":
        processor = tf.Owlv2Processor(image_processor=tf.Owlv2ImageProcessor(),  # 960 px, as google/owlv2-base-*
                                      tokenizer=make_tiny_clip_tokenizer(model_max_length=16, pad_token="!"))
        from serve_app.models.query_detectors import QueryDetector

        config = tf.Owlv2Config(vision_config={"image_size": 960})  # google/owlv2-base-*: 960 px, 60² patches
        return QueryDetector(tf.Owlv2ForObjectDetection(config), processor, device,
                             precision=ARGS.precision), "detector"
    if name == "omdet-turbo-swin-tiny":
        from serve_app.models.query_detectors import QueryDetector

        processor = tf.OmDetTurboProcessor(  # omlab/omdet-turbo-swin-tiny-hf: a 640 px square, no padding
            image_processor=tf.DetrImageProcessor(size={"height": 640, "width": 640}, do_pad=False),
            tokenizer=make_tiny_clip_tokenizer(model_max_length=77, pad_token=EOS))
        return QueryDetector(tf.OmDetTurboForObjectDetection(tf.OmDetTurboConfig()), processor, device,
                             precision=ARGS.precision), "detector"
    if name == "sam3":
        from serve_app.models.sam3_concept import Sam3Concept

        processor = tf.Sam3Processor(image_processor=tf.Sam3ImageProcessor(),
                                     tokenizer=make_tiny_clip_tokenizer(model_max_length=32))
        return Sam3Concept(tf.Sam3Model(tf.Sam3Config()), processor, device, precision=ARGS.precision), "detector"
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


MODELS = ["grounding-dino-tiny", "mm-grounding-dino-tiny", "owlv2-base-patch16", "omdet-turbo-swin-tiny", "sam3",
          *SAM2_SIZES, "sam-hq-vit_b", "sam-hq-vit_h", "edgetam"]


def measure(name: str, queue) -> None:
    import torch

    from serve_app.models.messages import DetectionRequest, SegmentationRequest
    from tests.imaging import pattern

    torch.manual_seed(0)
    # SAM's and SAM-HQ's ViT initialise their random weights with std 1e-10 (transformers' initializer_range):
    # activations become subnormal floats, which x86 computes ~10x slower (89 s for one ViT-B image here).
    # Trained weights have none; flushing them to zero keeps the random-weight timings those of real work.
    torch.set_flush_denormal(True)
    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
    started = time.perf_counter()
    model, role = build(name)
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.model.parameters())
    images = [pattern(*IMAGE_HW, seed=s) for s in range(ARGS.images + 1)]
    times = []
    for i, image in enumerate(images):
        if role == "segmenter":
            call = lambda: model.segment([SegmentationRequest(image=image, boxes=BOXES)])  # noqa: E731
        else:
            call = lambda: model.detect([DetectionRequest(image=image, phrases=["cats", "house"],  # noqa: E731
                                                          box_threshold=0.0, text_threshold=0.0, max_detections=20)])
        started = time.perf_counter()
        call()
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - started)
    queue.put({"model": name, "role": role, "parameters_m": round(params / 1e6, 1),
               "weights_fp32_mb": round(params * 4 / 2**20), "weights_fp16_mb": round(params * 2 / 2**20),
               "build_s": round(build_s, 1), "seconds_per_image": round(statistics.median(times), 3),
               "images_per_s": round(1 / statistics.median(times), 3),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, every core)")
    parser.add_argument("--out", default="benchmarks/results/model-table-cpu.json")
    ARGS = parser.parse_args()
    rows = []
    context = multiprocessing.get_context("fork")  # the child sees ARGS
    for name in ARGS.models.split(","):
        queue = context.Queue()
        process = context.Process(target=measure, args=(name, queue))
        process.start()
        process.join()
        row = queue.get() if not queue.empty() else {"model": name, "failed": f"exit code {process.exitcode}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {**machine(), "device": ARGS.device, "precision": ARGS.precision, "image": list(IMAGE_HW),
              "images": ARGS.images, "rows": rows}
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(json.dumps(result, indent=1) + "\n")


ARGS: argparse.Namespace
if __name__ == "__main__":
    main()
