"""Tiny random-weight SAM 3 checkpoints, saved the way the real ones are, built without the network.

`make_tiny_sam3` saves a plain detector checkpoint (config.json `model_type: "sam3"`, Sam3Model weights, the
Sam3Processor with a CLIP tokenizer); `make_tiny_sam3_video` saves what the hub's `facebook/sam3` is: a
`"sam3_video"` checkpoint holding the detector (`detector_model.*`), the interactive tracker (`tracker_model.*`)
and the tracker's own neck (`tracker_neck.*`) on the detector's shared ViT trunk. Their outputs are noise;
the geometry mirrors the real model's (a 14 px patch, windowed and global attention, a 4x/2x/1x/0.5x pyramid).

The CLIP tokenizer is serve_app.tiny_models.owlv2_omdet's, padded to SAM 3's 32 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from serve_app.tiny_models.owlv2_omdet import make_tiny_clip_tokenizer

IMAGE_SIZE = 112  # the processor resizes every image to this square (the real model: 1008)
PATCH = 14  # an 8 x 8 token grid (real: 72 x 72)
HIDDEN = 32  # ViT, FPN, DETR, geometry encoder and both mask decoders
NUM_QUERIES = 8  # real: 200
TEXT_LENGTH = 32  # Sam3Processor pads every phrase to 32 tokens, so CLIP needs 32 positions


def _clip_tokenizer():
    return make_tiny_clip_tokenizer(model_max_length=TEXT_LENGTH)


def _layer(**extra) -> dict:
    return {"hidden_size": HIDDEN, "num_attention_heads": 2, "intermediate_size": 2 * HIDDEN, **extra}


def tiny_sam3_config(tokenizer):
    from transformers import Sam3Config

    grid = IMAGE_SIZE // PATCH
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                "window_size": grid // 2, "global_attn_indexes": [1], "pretrain_image_size": IMAGE_SIZE // 2,
            },
            "fpn_hidden_size": HIDDEN,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],  # the tracker's
        },
        text_config={
            "model_type": "clip_text_model", "vocab_size": len(tokenizer), "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN, "projection_dim": HIDDEN, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": TEXT_LENGTH, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        geometry_encoder_config=_layer(num_layers=1),
        detr_encoder_config=_layer(num_layers=1),
        detr_decoder_config=_layer(num_layers=1, num_queries=NUM_QUERIES),
        mask_decoder_config={"hidden_size": HIDDEN, "num_attention_heads": 2, "num_upsampling_stages": 3},
    )


def _processor(tokenizer):
    from transformers import Sam3ImageProcessor, Sam3Processor

    image_processor = Sam3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         mask_size={"height": IMAGE_SIZE // 4, "width": IMAGE_SIZE // 4},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Sam3Processor(image_processor=image_processor, tokenizer=tokenizer, target_size=IMAGE_SIZE)


def make_tiny_sam3(out_dir: str | Path, seed: int = 0) -> Path:
    """A plain `"sam3"` checkpoint (the concept model alone, no tracker): about 0.2M parameters."""
    from transformers import Sam3Model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed)
    Sam3Model(tiny_sam3_config(tokenizer)).eval().save_pretrained(out_dir)
    _processor(tokenizer).save_pretrained(out_dir)
    return out_dir


def make_tiny_sam3_video(out_dir: str | Path, seed: int = 0) -> Path:
    """A `"sam3_video"` checkpoint laid out as the hub's facebook/sam3: detector, tracker, tracker neck."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()
    detector = tiny_sam3_config(tokenizer)
    tracker = {
        "model_type": "sam3_tracker_video",
        "image_size": IMAGE_SIZE,  # sets the prompt encoder's and the vision config's (default 1008)
        "vision_config": detector.vision_config.to_dict(),
        "prompt_encoder_config": {"hidden_size": HIDDEN, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                                  "mask_input_channels": 4},
        "mask_decoder_config": {"hidden_size": HIDDEN, "mlp_dim": 2 * HIDDEN, "num_attention_heads": 2,
                                "iou_head_hidden_dim": HIDDEN},
        "memory_attention_hidden_size": HIDDEN, "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 2 * HIDDEN,
        "memory_attention_rope_feat_sizes": [IMAGE_SIZE // PATCH] * 2,
        "memory_encoder_hidden_size": HIDDEN, "memory_encoder_output_channels": 16,
        "mask_downsampler_embed_dim": HIDDEN, "memory_fuser_num_layers": 1, "memory_fuser_embed_dim": HIDDEN,
        "memory_fuser_intermediate_dim": 2 * HIDDEN,
    }
    torch.manual_seed(seed)
    config = Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker)
    Sam3VideoModel(config).eval().save_pretrained(out_dir)
    _processor(tokenizer).save_pretrained(out_dir)
    return out_dir
