import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from serve_app.masks.rle import mask_to_rle


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


def test_masks_encoded_in_the_segmenter_travel_small_and_give_the_same_regions():
    import pickle

    from serve_app.ingress.label_config import parse_label_config
    from serve_app.ingress.results import build_click_prediction, mask_encodings
    from serve_app.masks.encode import encode_masks
    from serve_app.models.messages import Masks
    from tests.configs import CLICK_CONFIG, POLYGON_CLICK_CONFIG

    rng = np.random.default_rng(3)
    pixels = np.zeros((3, 480, 640), bool)
    pixels[0, 100:300, 200:500] = True
    pixels[1] = rng.random((480, 640)) > 0.5  # noise: the worst case for RLE
    pixels[2, 10:20, 10:20] = True
    raw = Masks(masks=pixels, scores=np.array([0.9, 0.8, 0.7], np.float32))
    for config_xml in (CLICK_CONFIG, POLYGON_CLICK_CONFIG):
        config = parse_label_config(config_xml)
        encoded = encode_masks(raw, mask_encodings(config), polygon_tolerance_px=1.0)
        assert encoded.masks.shape == (3, 0, 0)  # the pixels stay in the segmenter
        for index in range(3):
            single = Masks(masks=pixels[index:index + 1], scores=raw.scores[index:index + 1])
            one = Masks(masks=encoded.masks[index:index + 1], scores=encoded.scores[index:index + 1],
                        rle=encoded.rle[index:index + 1] if encoded.rle is not None else None,
                        polygons=encoded.polygons[index:index + 1] if encoded.polygons is not None else None)
            expected = build_click_prediction(config, "cats", single, 0.9, width=640, height=480, model_version="v")
            got = build_click_prediction(config, "cats", one, 0.9, width=640, height=480, model_version="v")
            strip = lambda p: [{k: v for k, v in r.items() if k != "id"} for r in p["result"]]  # noqa: E731
            assert len(strip(got)) == len(strip(expected)) > 0
            for a, b in zip(strip(got), strip(expected)):
                assert a["type"] == b["type"]
                if a["type"] == "brushlabels":
                    assert np.array_equal(a["value"]["rle"], b["value"]["rle"])
                else:
                    assert a == b
    smooth = encode_masks(Masks(masks=pixels[[0, 2]], scores=raw.scores[:2]), ("rle",))
    assert len(pickle.dumps(smooth)) < len(pickle.dumps(Masks(masks=pixels[[0, 2]], scores=raw.scores[:2]))) / 10
    with pytest.raises(ValueError, match="unknown mask encodings"):
        encode_masks(raw, ("png",))
