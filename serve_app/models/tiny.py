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


def make_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {
        "grounding_dino": make_tiny_grounding_dino(out_dir / "grounding-dino-tiny-random", seed),
        "sam": make_tiny_sam(out_dir / "sam-tiny-random.pth", seed),
    }
