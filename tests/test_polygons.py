import numpy as np
import pytest

from serve_app.masks.polygons import mask_to_polygons, rasterize


def shapes():
    yy, xx = np.mgrid[0:200, 0:300]
    yield "disc", (xx - 150) ** 2 + (yy - 100) ** 2 < 70 ** 2
    rect = np.zeros((200, 300), bool)
    rect[20:180, 40:120] = True
    yield "rectangle", rect
    ell = np.zeros((200, 300), bool)
    ell[30:170, 30:80] = True
    ell[120:170, 30:250] = True
    yield "L-shape", ell
    ring = ((xx - 150) ** 2 + (yy - 100) ** 2 < 80 ** 2) & ((xx - 150) ** 2 + (yy - 100) ** 2 > 30 ** 2)
    yield "ring (hole)", ring
    two = np.zeros((200, 300), bool)
    two[10:90, 10:90] = True
    two[120:190, 180:290] = True
    yield "two parts", two


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("name, mask", list(shapes()))
def test_polygons_rasterize_back_to_the_mask(name, mask):
    polygons = mask_to_polygons(mask, tolerance_px=1.0)
    assert polygons and all(len(p) >= 3 for p in polygons)
    assert all(0 <= x <= 100 and 0 <= y <= 100 for p in polygons for x, y in p)
    filled = rasterize(polygons, 300, 200)
    if name == "ring (hole)":  # documented rule: holes are filled
        yy, xx = np.mgrid[0:200, 0:300]
        assert iou(filled, (xx - 150) ** 2 + (yy - 100) ** 2 < 80 ** 2) >= 0.95
    else:
        assert iou(filled, mask) >= 0.95, name


def test_parts_become_separate_polygons_and_specks_are_dropped():
    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:40] = True
    mask[60:90, 50:95] = True
    mask[2:4, 95:97] = True  # a 4-pixel speck
    polygons = mask_to_polygons(mask)
    assert len(polygons) == 2
    assert rasterize(polygons[:1], 100, 100).sum() > rasterize(polygons[1:], 100, 100).sum()  # largest first


def test_simplification_reduces_points_within_tolerance():
    yy, xx = np.mgrid[0:400, 0:400]
    disc = (xx - 200) ** 2 + (yy - 200) ** 2 < 150 ** 2
    raw, fine, coarse = (mask_to_polygons(disc, t)[0] for t in (0.0, 0.25, 3.0))
    assert len(raw) <= 400  # every boundary pixel would be ~850 points: capped
    assert len(coarse) < len(fine) / 2
    assert iou(rasterize([coarse], 400, 400), disc) >= 0.95


def test_empty_mask_gives_no_polygons():
    assert mask_to_polygons(np.zeros((10, 10), bool)) == []
