"""MobileSAM fidelity: the official mobile_sam.pt layout loads strictly, and with the shared fixture's
synthetic weights the model reproduces the outputs of MobileSAM's own code (vit_t_reference.json)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serve_app.models.errors import CheckpointError
from serve_app.models.mobile_sam import UNUSED_KEYS
from serve_app.models.sam_loading import load_sam
from tests.conftest import SHARED
from tests.mobile_sam_weights import LAYOUT, synthetic_state_dict

FIXTURES = SHARED / "fixtures" / "mobile_sam"
REFERENCE = json.loads((FIXTURES / "vit_t_reference.json").read_text())
TOLERANCES = REFERENCE["suggested_tolerances"]
BOX = [[100.0, 200.0, 600.0, 700.0]]


def assert_fingerprint(tensor: torch.Tensor, expected: dict, atol: float, what: str):
    assert list(tensor.shape) == expected["shape"], what
    flat = tensor.detach().double().flatten()
    np.testing.assert_allclose(flat[expected["indices"]].numpy(), expected["values"], atol=atol, rtol=0, err_msg=what)
    for stat in ("mean", "min", "max", "abs_mean"):
        value = {"mean": flat.mean(), "min": flat.min(), "max": flat.max(), "abs_mean": flat.abs().mean()}[stat]
        assert abs(float(value) - expected[stat]) <= atol, f"{what} {stat}"
    if expected.get("std") is not None:
        assert abs(float(flat.std()) - expected["std"]) <= atol, f"{what} std"


@pytest.fixture(scope="module")
def state_dict():
    return synthetic_state_dict(LAYOUT["entries"])


@pytest.fixture(scope="module")
def checkpoint(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("mobile_sam") / "mobile_sam.pt"
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def sam(checkpoint):
    model, model_type = load_sam(checkpoint)  # type inferred from the keys
    assert model_type == "vit_t"
    return model


@pytest.fixture(scope="module")
def embedding(sam):
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1024, 1024, 3), dtype=torch.uint8)
    with torch.inference_mode():
        return sam.image_encoder(sam.preprocess(image.permute(2, 0, 1).contiguous()[None].float()))


def test_synthetic_weights_match_the_reference_recipe(state_dict):
    checks = REFERENCE["synthetic_state_dict_checks"]["checks"]
    assert len(state_dict) == LAYOUT["num_keys"] == len(checks) == 439
    for key, (total, abs_total, first) in checks.items():
        tensor = state_dict[key].double()
        assert float(tensor.sum()) == pytest.approx(total, rel=1e-6, abs=1e-6), key
        assert float(tensor.abs().sum()) == pytest.approx(abs_total, rel=1e-6, abs=1e-6), key
        assert float(tensor.flatten()[0]) == pytest.approx(first, rel=1e-6, abs=1e-9), key


def test_remapped_layout_is_exactly_the_models(state_dict):
    """Key by key and shape by shape, on the meta device: the renaming covers every key but the classifier."""
    from serve_app.models.mobile_sam import remap_mobile_sam_keys
    from serve_app.models.sam_builders import build_mobile_sam

    remapped, origin = remap_mobile_sam_keys(state_dict)
    with torch.device("meta"):
        model = build_mobile_sam()
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert {k: list(v.shape) for k, v in remapped.items()} == expected
    assert set(state_dict) - set(origin.values()) == {"image_encoder." + k for k in UNUSED_KEYS}


def test_official_layout_loads_strictly_dropping_only_the_classifier(sam, state_dict):
    model_keys = set(sam.state_dict())
    assert len(model_keys) == len(state_dict) - len(UNUSED_KEYS)
    assert not sam.training
    assert sam.image_encoder.img_size == 1024
    assert sum(p.numel() for p in sam.parameters()) == \
        LAYOUT["total_parameters"] - LAYOUT["image_encoder_unused_head_parameters(head.*+norm_head.*)"]


def test_missing_and_unexpected_keys_are_named(state_dict, tmp_path):
    broken = dict(state_dict)
    broken.pop("image_encoder.layers.1.blocks.0.attn.attention_biases")
    broken["image_encoder.layers.9.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as info:
        load_sam(path, "vit_t")
    message = str(info.value)
    assert "trunk.stages.1.blocks.0.attn.attention_biases" in message  # missing, in this model's names
    assert "image_encoder.layers.9.extra.weight" in message  # unexpected, in the checkpoint's names


def test_image_embedding_matches_mobile_sam(embedding):
    assert_fingerprint(embedding, REFERENCE["image_embedding"], TOLERANCES["image_embedding_atol"], "embedding")


def test_prompt_encoding_matches(sam):
    expected = REFERENCE["prompt"]
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor(BOX), masks=None)
        dense_pe = sam.prompt_encoder.get_dense_pe()
    assert_fingerprint(sparse, expected["sparse_embeddings"], 1e-6, "sparse")
    assert_fingerprint(dense, expected["dense_embeddings"], 1e-6, "dense")
    assert_fingerprint(dense_pe, expected["dense_pe"], 1e-6, "dense_pe")


def decode(sam, embedding, multimask: bool):
    with torch.inference_mode():
        sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor(BOX), masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask)


@pytest.mark.parametrize("mode", ["multimask_false", "multimask_true"])
def test_decoder_on_the_reference_embedding(sam, embedding, mode):
    expected = REFERENCE["decoder_on_reference_embedding"][mode]
    atol = TOLERANCES["decoder_on_reference_embedding"]
    low_res, iou = decode(sam, embedding, mode == "multimask_true")
    assert_fingerprint(low_res, expected["low_res_masks"], atol["low_res_masks_atol"], "low_res_masks")
    assert_fingerprint(iou, expected["iou_predictions"], atol["iou_predictions_atol"], "iou")
    upscaled = sam.postprocess_masks(low_res, (1024, 1024), (1024, 1024))
    assert_fingerprint(upscaled, expected["masks_upscaled_1024_logits(postprocess_masks)"],
                       atol["masks_upscaled_atol"], "upscaled")


@pytest.mark.parametrize("mode", ["multimask_false", "multimask_true"])
def test_decoder_on_the_synthetic_embedding(sam, mode):
    expected = REFERENCE["decoder_on_synthetic_embedding"]
    atol = TOLERANCES["decoder_on_synthetic_embedding"]
    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 64, 64)
    assert_fingerprint(embedding, expected["embedding"], 1e-9, "synthetic embedding")  # float64 summation order
    low_res, iou = decode(sam, embedding, mode == "multimask_true")
    assert_fingerprint(low_res, expected[mode]["low_res_masks"], atol["low_res_masks_atol"], "low_res_masks")
    assert_fingerprint(iou, expected[mode]["iou_predictions"], atol["iou_predictions_atol"], "iou")


def test_batched_service_path_equals_sam_predictor(sam):
    """The segmenter's multi-image path gives SamPredictor's masks at MobileSAM's real 1024 input size,
    for a portrait and a very small image encoded in one batch."""
    from serve_app.models.messages import SegmentationRequest
    from serve_app.models.segmenter import SamSegmenter
    from tests.imaging import pattern
    from tests.loopback import assert_matches_sam_predictor

    images = [pattern(320, 180, seed=2), pattern(12, 20, seed=3)]
    boxes = [np.array([[30, 40, 150, 300], [0, 0, 180, 320]], np.float32), np.array([[1, 1, 15, 10]], np.float32)]
    results = SamSegmenter(sam, torch.device("cpu")).segment(
        [SegmentationRequest(i, b) for i, b in zip(images, boxes)])
    assert_matches_sam_predictor(sam, images, boxes, results)
