import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from serve_app.ingress.rle import mask_to_rle


def masks():
    rng = np.random.default_rng(0)
    yield "noise", rng.random((37, 53)) > 0.5
    blob = np.zeros((120, 160), bool)
    blob[30:90, 40:150] = True
    yield "blob", blob
    yield "empty", np.zeros((10, 10), bool)
    yield "full", np.ones((9, 7), bool)
    yield "one pixel", np.ones((1, 1), bool)
    long_run = np.zeros((300, 300), bool)  # 4 x 90000 RGBA bytes: runs longer than one record
    long_run[150:, :] = True
    yield "long runs", long_run


@pytest.mark.parametrize("name, mask", list(masks()))
def test_same_bytes_as_the_sdk_and_decodes_back(name, mask):
    encoded = mask_to_rle(mask).tolist()
    assert encoded == mask2rle(mask.astype(np.uint8) * 255)
    decoded = decode_rle(encoded).reshape(mask.shape[0], mask.shape[1], 4)
    assert np.array_equal(decoded[:, :, 3] > 0, mask)


def test_uint8_masks_are_accepted():
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:5] = 255
    assert mask_to_rle(mask).tolist() == mask2rle(mask)


def test_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2), bool))
