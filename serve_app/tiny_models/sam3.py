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


def _layer(hidden: int = HIDDEN, **extra) -> dict:
    return {"hidden_size": hidden, "num_attention_heads": 2, "intermediate_size": 2 * hidden, **extra}


def tiny_sam3_config(tokenizer, hidden: int = HIDDEN):
    from transformers import Sam3Config

    grid = IMAGE_SIZE // PATCH
    return Sam3Config(
        vision_config={
            "backbone_config": {
                "model_type": "sam3_vit_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                "window_size": grid // 2, "global_attn_indexes": [1], "pretrain_image_size": IMAGE_SIZE // 2,
            },
            "fpn_hidden_size": hidden,
            "backbone_feature_sizes": [[grid * 4, grid * 4], [grid * 2, grid * 2], [grid, grid]],  # the tracker's
        },
        text_config={
            "model_type": "clip_text_model", "vocab_size": len(tokenizer), "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN, "projection_dim": HIDDEN, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": TEXT_LENGTH, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        geometry_encoder_config=_layer(hidden, num_layers=1),
        detr_encoder_config=_layer(hidden, num_layers=1),
        detr_decoder_config=_layer(hidden, num_layers=1, num_queries=NUM_QUERIES),
        mask_decoder_config={"hidden_size": hidden, "num_attention_heads": 2, "num_upsampling_stages": 3},
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


def make_tiny_sam3_video(out_dir: str | Path, seed: int = 0, width: int = HIDDEN) -> Path:
    """A `"sam3_video"` checkpoint laid out as the hub's facebook/sam3: detector, tracker, tracker neck.

    width=128 makes one whose video model tracks (`Sam3VideoModel`, serve_app.models.sam3_video_tracker): the
    tracker's memory attention reads memories 64 wide whatever the config says, and an object pointer (the FPN's
    width, shared with the detector) must split into two or more of them (transformers 5.25). The default 32 is
    enough for images (the detector and the interactive tracker on one frame)."""
    from transformers import Sam3VideoConfig, Sam3VideoModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _clip_tokenizer()
    detector = tiny_sam3_config(tokenizer, width)
    tracker = {
        "model_type": "sam3_tracker_video",
        "image_size": IMAGE_SIZE,  # sets the prompt encoder's and the vision config's (default 1008)
        "vision_config": detector.vision_config.to_dict(),
        "prompt_encoder_config": {"hidden_size": width, "image_size": IMAGE_SIZE, "patch_size": PATCH,
                                  "mask_input_channels": 4},
        "mask_decoder_config": {"hidden_size": width, "mlp_dim": 2 * HIDDEN, "num_attention_heads": 2,
                                "iou_head_hidden_dim": HIDDEN},
        "memory_attention_hidden_size": width, "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 2 * HIDDEN,
        "memory_attention_rope_feat_sizes": [IMAGE_SIZE // PATCH] * 2,
        "memory_encoder_hidden_size": width, "memory_encoder_output_channels": 64 if width > 64 else 16,
        "mask_downsampler_embed_dim": width, "memory_fuser_num_layers": 1, "memory_fuser_embed_dim": width,
        "memory_fuser_intermediate_dim": 2 * HIDDEN,
    }
    torch.manual_seed(seed)
    # detection thresholds at 0 (the real model's: 0.5 to keep, 0.7 to start an object): random weights score
    # about 0.5, and the video tests need objects to track
    config = Sam3VideoConfig(detector_config=detector.to_dict(), tracker_config=tracker,
                             score_threshold_detection=0.0, new_det_thresh=0.0)
    model = Sam3VideoModel(config).eval()
    if width > 64:
        # random weights see no object after the first frame (a negative object score blanks the tracker's mask); a
        # positive bias on its object-score head keeps tracked objects present, so the video tests have tracks
        with torch.no_grad():
            model.tracker_model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    model.save_pretrained(out_dir)
    _video_processor(tokenizer).save_pretrained(out_dir)  # the image processor's files too, as the hub's
    return out_dir


def _video_processor(tokenizer):
    """Sam3VideoProcessor: the image processor and tokenizer of Sam3Processor, and a video processor of the same
    size (only whole-video sessions use it; streaming prepares each frame with the image processor)."""
    from transformers import Sam2VideoVideoProcessor, Sam3VideoProcessor

    image = _processor(tokenizer)
    video = Sam2VideoVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3)
    return Sam3VideoProcessor(image_processor=image.image_processor, video_processor=video, tokenizer=tokenizer,
                              target_size=IMAGE_SIZE)
