"""Tiny random-weight models, saved in the same formats as the real ones.

Used by tests and by the offline demo mode: the service loads them through exactly the code that
loads `IDEA-Research/grounding-dino-tiny` and `sam_vit_h_4b8939.pth`. Their outputs are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Grounding DINO's modelling code hard-codes bert-base-uncased ids for [CLS]=101, [SEP]=102, "."=1012
# and "?"=1029 to split phrases, so the vocabulary puts those tokens at exactly those ids.
_SPECIAL_IDS = {"[CLS]": 101, "[SEP]": 102, ".": 1012, "?": 1029}
_WORDS = ["a", "an", "the", "cat", "cats", "dog", "house", "car", "person", "tree", "brown", "of", "and"]


def _bert_vocab() -> list[str]:
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)]
    vocab += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - 104)]
    vocab += [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # "." lands on 1012, "?" on 1029
    vocab += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [w for w in _WORDS if w not in vocab]
    for token, index in _SPECIAL_IDS.items():
        assert vocab[index] == token, (token, index)
    return vocab


def make_tiny_grounding_dino(out_dir: str | Path, seed: int = 0, full_size: bool = False,
                             family: str = "grounding-dino") -> Path:
    """Save a ~1.4M-parameter Grounding DINO with processor and tokenizer to `out_dir`.

    `full_size`: the default configuration instead (grounding-dino-tiny's layout, 172M parameters, the
    real 800-1333 px preprocessing), still random and with the small vocabulary: for benchmarks.
    `family`: "mm-grounding-dino" saves the same sizes as MM Grounding DINO (LLMDet's architecture)."""
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
        SwinConfig,
    )

    config_class, model_class = {
        "grounding-dino": (GroundingDinoConfig, GroundingDinoForObjectDetection),
        "mm-grounding-dino": (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection),
    }[family]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab()
    vocab_file = out_dir / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    # transformers 5 ignores `vocab_file=`; `vocab=` is the argument that is read.
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), do_lower_case=True, model_max_length=256)
    image_processor = (GroundingDinoImageProcessor() if full_size
                       else GroundingDinoImageProcessor(size={"shortest_edge": 224, "longest_edge": 320}))
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = config_class() if full_size else config_class(
        backbone_config=SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=7,
                                   out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2,  # decoder_layers=1 breaks weight tying in transformers 5
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=30, max_text_len=256,
    )
    torch.manual_seed(seed)
    model_class(config).eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def make_tiny_sam(out_file: str | Path, seed: int = 0) -> Path:
    """Save a tiny SAM state dict as a `.pth`, like the official checkpoints."""
    from serve_app.models.sam_builders import build_tiny_sam

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(build_tiny_sam().state_dict(), out_file)
    return out_file


SAM_FAMILY_TYPES = ("sam2", "sam2_video", "edgetam", "edgetam_video", "sam_hq", "sam")


def make_tiny_sam_family(out_dir: str | Path, family: str = "sam2", seed: int = 0) -> Path:
    """Save a tiny transformers SAM-family model (config.json model_type `family`) with its processor.

    The encoder input stays 1024 px, as the processors prepare it; the widths and depths are small. `sam2_video`
    and `edgetam_video` save the video model with its video processor, as the hub's SAM 2.1 and EdgeTAM
    checkpoints are; EdgeTAM's timm backbone is timm's `test_convnext` in place of RepViT (the same strides, 4 to
    32)."""
    import transformers as tf

    # Video models are 128 wide with 64-wide memories: their memory attention reads memories 64 wide whatever the
    # config says, and an object pointer (the decoder's width) must split into two or more memory-wide tokens
    # (transformers 5.25 keeps an extra axis when it splits into one), as the real ones' 256 into 4 x 64
    width = 128 if family.endswith("_video") else 32
    small_decoder = dict(hidden_size=width, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    prompt = dict(hidden_size=width)
    # and see 512 px frames, not 1024: memory attention is quadratic in the feature map (32 x 32, not 64 x 64)
    video_size = 512
    prompt_video = dict(prompt, image_size=video_size)
    small_memory = dict(memory_attention_hidden_size=width, memory_encoder_hidden_size=width,
                        memory_encoder_output_channels=64, mask_downsampler_embed_dim=width, memory_fuser_embed_dim=width,
                        memory_fuser_intermediate_dim=64, image_size=video_size,
                        memory_attention_rope_feat_sizes=[video_size // 16] * 2)
    sized = {"height": video_size, "width": video_size}
    video_processor = dict(image_processor=tf.Sam2ImageProcessor(size=sized),
                           video_processor=tf.Sam2VideoVideoProcessor(size=sized))
    if family in ("sam2", "sam2_video"):
        hiera = dict(model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1,
                     blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[16, 32, 64, 128],
                     num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[8, 4, 14, 7],
                     global_attention_blocks=[3], window_positional_embedding_background_size=[7, 7])
        vision = dict(backbone_config=hiera, backbone_channel_list=[128, 64, 32, 16], fpn_hidden_size=width)
        if family == "sam2_video":
            vision["backbone_feature_sizes"] = [[video_size // 4 // 2 ** i] * 2 for i in range(3)]
        if family == "sam2":
            model = tf.Sam2Model(tf.Sam2Config(vision_config=vision, prompt_encoder_config=prompt,
                                               mask_decoder_config=small_decoder))
        else:
            model = tf.Sam2VideoModel(tf.Sam2VideoConfig(vision_config=vision, prompt_encoder_config=prompt_video,
                                                         mask_decoder_config=small_decoder, **small_memory,
                                                         memory_attention_feed_forward_hidden_size=64,
                                                         memory_attention_num_layers=1))
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor()) if family == "sam2" \
            else tf.Sam2VideoProcessor(**video_processor)
    elif family == "edgetam_video":
        backbone = tf.TimmWrapperConfig(architecture="test_convnext",
                                        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
        # model_type: EdgeTamVideoConfig's default vision config is SAM 2's Hiera (the hub's names EdgeTAM's)
        vision = dict(model_type="edgetam_vision_model", backbone_config=backbone,
                      backbone_channel_list=[64, 48, 32, 24], fpn_hidden_size=width,
                      backbone_feature_sizes=[[video_size // 4 // 2 ** i] * 2 for i in range(3)])
        model = tf.EdgeTamVideoModel(tf.EdgeTamVideoConfig(
            vision_config=vision, prompt_encoder_config=prompt_video, mask_decoder_config=small_decoder, **small_memory,
            memory_attention_mlp_hidden_size=64, memory_attention_num_layers=1, perceiver_resampler_num_latents=16,
            perceiver_resampler_num_latents_2d=256, perceiver_resampler_hidden_size=64,
            perceiver_resampler_mlp_intermediate_size=64, perceiver_resampler_attention_head_dim=64,
            perceiver_resampler_num_layers=1))
        processor = tf.Sam2VideoProcessor(**video_processor)
    elif family == "edgetam":
        backbone = tf.TimmWrapperConfig(architecture="test_convnext",
                                        model_args={"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]})
        vision = dict(backbone_config=backbone, backbone_channel_list=[64, 48, 32, 24], fpn_hidden_size=32)
        model = tf.EdgeTamModel(tf.EdgeTamConfig(vision_config=vision, prompt_encoder_config=prompt,
                                                 mask_decoder_config=small_decoder))
        processor = tf.Sam2Processor(image_processor=tf.Sam2ImageProcessor())
    elif family in ("sam_hq", "sam"):
        vision = dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                      global_attn_indexes=[1], window_size=7, mlp_dim=64, num_pos_feats=16)
        if family == "sam_hq":
            model = tf.SamHQModel(tf.SamHQConfig(vision_config=vision, prompt_encoder_config=prompt,
                                                 mask_decoder_config={**small_decoder, "vit_dim": 32}))
            processor = tf.SamHQProcessor(image_processor=tf.SamImageProcessor())
        else:
            model = tf.SamModel(tf.SamConfig(vision_config=vision, prompt_encoder_config=prompt,
                                             mask_decoder_config=small_decoder))
            processor = tf.SamProcessor(image_processor=tf.SamImageProcessor())
    else:
        raise ValueError(f"unknown SAM family {family!r}; one of {', '.join(SAM_FAMILY_TYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model.init_weights()  # the constructor's weights did not see the seed
    if family.endswith("_video"):
        # random weights see no object on most frames (a negative object score blanks the mask); a positive bias
        # on the object-score head keeps tracked objects present, so tracks and parity tests have masks to compare
        with torch.no_grad():
            model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "grounding_dino": make_tiny_grounding_dino(out_dir / "grounding-dino-tiny-random", seed),
        "sam": make_tiny_sam(out_dir / "sam-tiny-random.pth", seed),
    }
