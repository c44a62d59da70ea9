"""The windowed mask post-processing equals segment-anything's `Sam.postprocess_masks(...) > 0`, pixel for pixel,
except where SAM's own logit is within 1e-5 of the threshold."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from serve_app.models.mask_upsampling import upsample_masks

SAM_SHAPE = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024))


def sam_reference(low_res: torch.Tensor, original_size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor]:
    input_size = ResizeLongestSide.get_preprocess_shape(*original_size, 1024)
    logits = Sam.postprocess_masks(SAM_SHAPE, low_res[:, None], input_size, original_size)[:, 0]
    return input_size, logits


def assert_same_masks(low_res: torch.Tensor, original_size: tuple[int, int], **options) -> np.ndarray:
    input_size, logits = sam_reference(low_res, original_size)
    masks = upsample_masks(low_res, input_size, original_size, **options)
    assert masks.shape == (len(low_res), *original_size) and masks.dtype == bool
    differ = masks != (logits > 0).numpy()
    assert not (differ & (logits.abs() > 1e-5).numpy()).any(), f"{int(differ.sum())} pixels differ"
    return masks


def blobs(count: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """Negative logits with one positive rectangle each (what a trained SAM returns), optionally noisy."""
    rng = np.random.default_rng(seed)
    low = np.full((count, 256, 256), -4.0, np.float32)
    for mask in low:
        y, x = rng.integers(0, 230, 2)
        h, w = rng.integers(1, 60, 2)
        mask[y:y + h, x:x + w] = rng.uniform(0.5, 8.0)
    return torch.from_numpy(low + noise * rng.standard_normal(low.shape).astype(np.float32))


SIZES = [(480, 640), (640, 480), (768, 1024), (1024, 1024), (12, 20), (1, 1), (1, 2000), (2000, 1), (333, 517),
         (3000, 4000)]


@pytest.mark.parametrize("original_size", SIZES)
def test_masks_equal_sams_post_processing_windowed_and_whole(original_size):
    rng = torch.Generator().manual_seed(sum(original_size))
    noise = torch.randn(4, 256, 256, generator=rng) * 6  # random weights' masks: positive everywhere
    for low_res in (blobs(6, sum(original_size)), blobs(4, 1, noise=1.5), noise):
        assert_same_masks(low_res, original_size, windowed_up_to=1.0)  # every mask through its window
        assert_same_masks(low_res, original_size, windowed_up_to=0.0)  # every mask through SAM's two resizes
        assert_same_masks(low_res, original_size)  # the default choice


def test_edge_cases_all_background_all_foreground_and_the_threshold_itself():
    low_res = torch.stack([torch.full((256, 256), -1.0), torch.full((256, 256), 2.0), torch.zeros(256, 256)])
    masks = assert_same_masks(low_res, (300, 400))
    assert not masks[0].any() and masks[1].all() and not masks[2].any()  # a logit of exactly 0 is background


def test_a_small_mask_only_touches_its_window():
    """A positive patch in the padding SAM crops away gives an empty mask; one in the image stays inside the
    dilated box of its low-resolution patch."""
    low_res = torch.full((2, 256, 256), -5.0)
    low_res[0, 250:, 250:] = 5.0  # padding (the image is 1024 x 768 there: rows >= 192 are padding)
    low_res[1, 100:110, 50:60] = 5.0
    masks = assert_same_masks(low_res, (768, 1024))
    assert not masks[0].any()
    ys, xs = np.nonzero(masks[1])
    assert 99 * 4 <= ys.min() and ys.max() < 111 * 4 and 49 * 4 <= xs.min() and xs.max() < 61 * 4


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 1500), width=st.integers(1, 1500), seed=st.integers(0, 2**31 - 1),
       noise=st.sampled_from([0.0, 0.5, 3.0]))
def test_any_image_size_and_any_logits(height, width, seed, noise):
    assert_same_masks(blobs(3, seed, noise=noise), (height, width))
