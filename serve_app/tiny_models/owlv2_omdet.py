"""Tiny random-weight detectors that read text with a CLIP tokenizer (OWLv2, OmDet-Turbo), built offline.

Like serve_app.tiny_models.grounding_dino_sam: saved with save_pretrained in the formats of the real checkpoints and loaded through
the production code; their outputs are noise. Each builder is deterministic for a seed, writes a few hundred KB
and runs a forward pass in milliseconds on a CPU.

The tokenizer is a real CLIPTokenizer with a small vocabulary: every byte has a token (any text, emoji included,
tokenizes), a few hundred merges learnt from a fixed word list, and <|startoftext|> and <|endoftext|> as the two
highest ids. That last point matters: OWLv2, OmDet-Turbo and SAM 3 pool a text at `input_ids.argmax(-1)`, which
must land on the end-of-text token, as it does with the real CLIP vocabulary.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words whose frequent letter pairs become merges: only so that tokens look like CLIP's (several letters), the
# models work on any ids.
_WORDS = (
    "a an the of and in on with for to is this that photo picture image object person people man woman child "
    "cat cats dog dogs bird horse cow house houses car bus truck train bicycle boat tree trees flower chair table "
    "bed phone book cup bottle bowl apple banana orange pizza ball bag shoe hat red green blue black white yellow "
    "brown small large detect find sign light traffic street road window door wall sky water grass"
).split()


def _learn_merges(count: int) -> list[tuple[str, str]]:
    """Byte-pair merges from _WORDS, ties broken by the pair itself so every build gives the same list.

    Words are split as CLIP's BPE splits them: characters, the last one carrying the end-of-word suffix."""
    words = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in _WORDS)
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for symbols, seen in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += seen
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter = Counter()
        for symbols, seen in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += seen
        words = merged
    return merges


def clip_vocabulary(num_merges: int = 200) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: the 256 byte symbols, their 256 end-of-word forms, the merges' results, then BOS and EOS."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    known = set(tokens)
    merges = []
    for left, right in _learn_merges(num_merges):
        merges.append((left, right))
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def make_tiny_clip_tokenizer(save_dir: str | Path | None = None, *, model_max_length: int = 77,
                             pad_token: str = EOS, num_merges: int = 200):
    """A small CLIPTokenizer (about 700 ids). `model_max_length`: the text length the processor pads to (OWLv2 16,
    OmDet-Turbo 77, SAM 3 32). `pad_token`: EOS as in openai/clip-*, or "!" (id 0) as in google/owlv2-*."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary(num_merges)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS,
                              pad_token=pad_token, model_max_length=model_max_length)
    # pooling at argmax(input_ids) finds the end of the text only if EOS is the highest id
    assert tokenizer.eos_token_id == len(vocab) - 1 and tokenizer.bos_token_id == len(vocab) - 2
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def make_tiny_owlv2(out_dir: str | Path, seed: int = 0, *, image_size: int = 64, text_length: int = 16) -> Path:
    """Save a ~70k-parameter Owlv2ForObjectDetection with its processor (model_type "owlv2") to `out_dir`."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Padded with "!" (id 0) like google/owlv2-*; Owlv2Processor pads every query to model_max_length, which
    # must then be the text model's number of positions.
    tokenizer = make_tiny_clip_tokenizer(model_max_length=text_length, pad_token="!")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=text_length,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sizes),
        vision_config=dict(image_size=image_size, patch_size=16, **sizes),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # Initialised as is, the box head's output saturates the sigmoid: boxes of zero width at the image's
        # edges. Small last-layer weights leave each patch its prior box (sigmoid of the box bias) plus a little.
        model.box_head.dense2.weight.normal_(0.0, 0.02)
        # Likewise the class head's per-patch logit scale and shift: as initialised most scores are exactly 1.0
        # in float32 (ties everywhere); small ones keep the scores spread inside (0, 1).
        for layer in (model.class_head.logit_scale, model.class_head.logit_shift):
            layer.weight.normal_(0.0, 0.05)
            layer.bias.zero_()
    model.save_pretrained(out_dir)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def make_tiny_omdet_turbo(out_dir: str | Path, seed: int = 0, *, image_size: int = 128, num_queries: int = 20) -> Path:
    """Save a ~170k-parameter OmDetTurboForObjectDetection with its processor (model_type "omdet-turbo")."""
    from transformers import DetrImageProcessor, OmDetTurboConfig, OmDetTurboForObjectDetection, OmDetTurboProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # OmDetTurboProcessor pads and truncates every text to 77 tokens, so the text model needs 77 positions.
    tokenizer = make_tiny_clip_tokenizer(model_max_length=77, pad_token=EOS)
    swin, hidden, text = 8, 16, 32
    config = OmDetTurboConfig(
        text_config=dict(model_type="clip_text_model", vocab_size=len(tokenizer), hidden_size=text,
                         intermediate_size=2 * text, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        # transformers' Swin instead of the default timm backbone (which needs timm and its weights)
        use_timm_backbone=False,
        backbone_config=dict(model_type="swin", embed_dim=swin, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                             window_size=4, image_size=image_size, out_indices=(2, 3, 4)),
        # the LayerNorm after the backbone expects timm's channels-last maps; transformers' Swin gives channels-first
        apply_layernorm_after_vision_backbone=False,
        image_size=image_size,
        encoder_in_channels=[2 * swin, 4 * swin, 8 * swin],
        encoder_hidden_dim=hidden, decoder_hidden_dim=hidden, vision_features_channels=[hidden] * 3,
        encoder_layers=1, encoder_attention_heads=2, encoder_dim_feedforward=32, encoder_projection_indices=[2],
        decoder_num_layers=1, decoder_num_heads=2, decoder_dim_feedforward=32, decoder_num_points=4,
        num_feature_levels=3, num_queries=num_queries,
        class_embed_dim=text, text_projection_in_dim=text, text_projection_out_dim=text, task_encoder_hidden_dim=32,
        disable_custom_kernels=True,
    )
    torch.manual_seed(seed)
    model = OmDetTurboForObjectDetection(config).eval()
    with torch.no_grad():
        # The decoder's box head starts at zero, leaving every box its anchor: a grid of small boxes that never
        # overlap, so non-maximum suppression would have nothing to do. Larger, varied boxes overlap.
        last = model.decoder.decoder_bbox_head[-1].layers[-1]
        last.weight.normal_(0.0, 0.2)
        last.bias.copy_(torch.tensor([0.0, 0.0, 1.5, 1.5]))
    model.save_pretrained(out_dir)
    # omlab/omdet-turbo-swin-tiny-hf's preprocessing (a fixed square resize, no padding), smaller
    image_processor = DetrImageProcessor(size={"height": image_size, "width": image_size}, do_pad=False)
    OmDetTurboProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
