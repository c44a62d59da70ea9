"""Masks travel between processes packed 8 pixels per byte and come back unchanged."""

import pickle

import numpy as np

from serve_app.models.messages import Masks


def test_masks_pickle_packed_and_round_trip_exactly():
    rng = np.random.default_rng(0)
    masks = Masks(masks=rng.random((25, 48, 64)) > 0.5, scores=rng.random(25).astype(np.float32), cache_hit=True)
    data = pickle.dumps(masks, protocol=5)
    assert len(data) < masks.masks.size / 8 + 2000  # packed, not one byte per pixel
    back = pickle.loads(data)
    assert back.masks.dtype == bool and back.masks.shape == (25, 48, 64)
    assert np.array_equal(back.masks, masks.masks) and np.array_equal(back.scores, masks.scores)
    assert back.cache_hit is True
    back.masks[0, 0, 0] = not back.masks[0, 0, 0]  # writable, like the array that was sent


def test_empty_masks_round_trip():
    for shape in [(0, 0, 0), (0, 12, 20), (1, 1, 1)]:
        back = pickle.loads(pickle.dumps(Masks(masks=np.ones(shape, bool))))
        assert back.masks.shape == shape and back.masks.all()
