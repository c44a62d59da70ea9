"""Label Studio's params.context, read once per request: prompt text, thresholds, drawn regions."""

import numpy as np
import pytest

from serve_app.ingress.context import parse_context
from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import parse_label_config
from tests.configs import CLICK_CONFIG, SEED_CONFIG
from tests.conftest import load_ls_fixture

SEED = parse_label_config(SEED_CONFIG)
CLICKS = parse_label_config(CLICK_CONFIG)


def keypoint(x, y, positive=True, label="cats"):
    return {"type": "keypointlabels", "from_name": "tag2", "to_name": "image", "is_positive": positive,
            "original_width": 400, "original_height": 200,
            "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]}}


def number(name, value):
    return {"type": "number", "from_name": name, "to_name": "image", "value": {"number": value}}


def parse(result, config=SEED, max_items=100):
    return parse_context({"result": result}, config, max_items)


def test_prompt_comes_from_the_textarea_result_label_studio_sends():
    body = load_ls_fixture("predict_interactive.json")["body"]
    assert parse_context(body["params"]["context"], SEED, 100).prompt_text == "house"
    assert parse_context(None, SEED, 100).prompt_text is None  # batch "Retrieve predictions"
    assert parse([{"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 1, "height": 1}}]).prompt_text is None


def test_percent_clicks_and_boxes_become_pixels_of_each_image():
    context = parse([
        keypoint(25.0, 50.0), keypoint(75.0, 10.0, positive=False),
        {"type": "rectanglelabels", "value": {"x": 10, "y": 20, "width": 50, "height": 30,
                                              "rectanglelabels": ["cats"]}},
    ], CLICKS)
    clicks = context.regions.in_pixels(width=400, height=200)
    np.testing.assert_allclose(clicks.points, [[100, 100], [300, 20]])
    assert clicks.point_labels.tolist() == [1, 0]
    np.testing.assert_allclose(clicks.box, [[40, 40, 240, 100]])
    assert clicks.label == "cats" and bool(clicks)
    np.testing.assert_allclose(context.regions.in_pixels(width=40, height=20).points, [[10, 10], [30, 2]])


def test_no_regions_and_out_of_range_regions():
    assert not parse_context(None, CLICKS, 10).regions
    assert not parse([{"type": "textarea", "value": {"text": ["x"]}}], CLICKS).regions
    clamped = parse([keypoint(140.0, -5.0)], CLICKS).regions.in_pixels(100, 100)
    np.testing.assert_allclose(clamped.points, [[100, 0]])


@pytest.mark.parametrize("x", ["left", None, [1], True, float("nan"), float("inf"), 10**400])
def test_a_region_coordinate_that_is_not_a_finite_number_is_a_clear_400(x):
    with pytest.raises(BadRequest, match="value.x") as info:
        parse([keypoint(x, 3)], CLICKS)
    assert info.value.status_code == 400


def test_thresholds_from_the_context_are_checked_in_one_place():
    assert parse([number("box_threshold", 0.5), number("text_threshold", "0.1")]).thresholds == \
        {"box_threshold": 0.5, "text_threshold": 0.1}
    for bad in (7, [0.1], "high", {"a": 1}, 10**4000, float("nan"), None, True):
        with pytest.raises(BadRequest, match="box_threshold must be"):
            parse([number("box_threshold", bad)])
    with pytest.raises(BadRequest, match="box_threshold must be"):  # value itself is not an object
        parse([{"type": "number", "from_name": "box_threshold", "value": [0.2]}])


def test_the_context_is_bounded_and_must_be_shaped_as_label_studio_sends_it():
    with pytest.raises(BadRequest, match="limit is 3 \\(MAX_CONTEXT_ITEMS\\)") as info:
        parse([keypoint(1, 1)] * 4, CLICKS, max_items=3)
    assert info.value.status_code == 413
    with pytest.raises(BadRequest, match="limit is 64"):
        parse([keypoint(1, 1)] * 65, CLICKS)
    with pytest.raises(BadRequest, match="must be a JSON object"):
        parse_context(["result"], SEED, 10)
    with pytest.raises(BadRequest, match="must be a list"):
        parse_context({"result": {"type": "textarea"}}, SEED, 10)
    assert parse(["not a dict", 5, None]).prompt_text is None  # items that are not regions are ignored
