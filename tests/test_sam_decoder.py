"""SharedImageDecoder (image side shared, cross-attention in token space, channels-last up-scaling) equals
segment-anything's MaskDecoder on the same prompts: the real decoder architecture (SAM, MobileSAM: 256 channels,
8 heads, 64x64 image tokens) and the tests' tiny one, box batches of 1 to 7, single and multi-mask output."""

import pytest
import torch

from serve_app.models.sam_builders import assemble_sam
from serve_app.models.sam_decoder import SharedImageDecoder


def _sam(img_size, prompt_dim, mlp_dim, heads, iou_hidden):
    torch.manual_seed(0)
    sam = assemble_sam(torch.nn.Identity(), img_size=img_size, prompt_dim=prompt_dim, decoder_mlp_dim=mlp_dim,
                       decoder_heads=heads, iou_hidden_dim=iou_hidden).eval()
    for parameter in sam.parameters():  # trained-like scales, so that no output is trivially tied
        torch.nn.init.normal_(parameter, std=0.2)
    return sam


@pytest.mark.parametrize("architecture", [(1024, 256, 2048, 8, 256), (256, 32, 64, 2, 32)], ids=["sam", "tiny"])
@pytest.mark.parametrize("boxes", [1, 3, 7])
@pytest.mark.parametrize("multimask", [False, True])
@torch.inference_mode()
def test_shared_decoder_equals_mask_decoder(architecture, boxes, multimask):
    sam = _sam(*architecture)
    grid = architecture[0] // 16
    generator = torch.Generator().manual_seed(boxes)
    embedding = torch.randn(1, architecture[1], grid, grid, generator=generator)
    corners = torch.rand(boxes, 2, 2, generator=generator) * architecture[0]
    box_coords = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
    sparse, dense = sam.prompt_encoder(points=None, boxes=box_coords, masks=None)
    pe = sam.prompt_encoder.get_dense_pe()

    expected_masks, expected_iou = sam.mask_decoder(image_embeddings=embedding, image_pe=pe,
                                                    sparse_prompt_embeddings=sparse,
                                                    dense_prompt_embeddings=dense, multimask_output=multimask)
    masks, iou = SharedImageDecoder(sam.mask_decoder, embedding, pe, dense[:1])(sparse, multimask=multimask)

    assert masks.shape == expected_masks.shape and iou.shape == expected_iou.shape
    scale = expected_masks.abs().max()
    assert scale > 1e-2  # the comparison means something: logits are not all zero
    assert torch.allclose(masks, expected_masks, rtol=1e-4, atol=1e-4 * scale)
    assert torch.allclose(iou, expected_iou, rtol=1e-4, atol=1e-5)
    decided = expected_masks.abs() > 1e-3 * scale  # every pixel not within rounding of the threshold agrees
    assert torch.equal((masks > 0)[decided], (expected_masks > 0)[decided])


def test_a_batch_of_images_is_refused():
    sam = _sam(256, 32, 64, 2, 32)
    embedding = torch.zeros(2, 32, 16, 16)
    with pytest.raises(ValueError, match="one image"):
        SharedImageDecoder(sam.mask_decoder, embedding, sam.prompt_encoder.get_dense_pe(), torch.zeros(1, 32, 16, 16))


@torch.inference_mode()
def test_an_output_upscaling_of_another_shape_runs_as_it_is():
    """The channels-last up-scaling knows SAM's five layers; any other stack is run as its own module, still equal."""
    sam = _sam(256, 32, 64, 2, 32)
    layers = list(sam.mask_decoder.output_upscaling)
    sam.mask_decoder.output_upscaling = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[3], layers[4])
    generator = torch.Generator().manual_seed(3)
    embedding = torch.randn(1, 32, 16, 16, generator=generator)
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.tensor([[10.0, 20.0, 200.0, 150.0]]), masks=None)
    pe = sam.prompt_encoder.get_dense_pe()
    expected, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                   dense_prompt_embeddings=dense, multimask_output=False)
    masks, _ = SharedImageDecoder(sam.mask_decoder, embedding, pe, dense[:1])(sparse)
    assert torch.allclose(masks, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
