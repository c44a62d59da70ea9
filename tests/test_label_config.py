import pytest

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import parse_label_config
from tests.configs import PREDICTED_VALUES_CONFIG, SEED_CONFIG


def test_seed_config():
    config = parse_label_config(SEED_CONFIG)
    assert (config.image_name, config.image_key, config.prompt_name) == ("image", "image", "prompt")
    assert config.boxes.name == "label" and config.boxes.labels == ("cats", "house")
    assert config.masks.name == "label2" and config.masks.to_name == "image"
    assert config.aliases == {"cats": "cats", "house": "house"}
    assert config.thresholds == {}


def test_predicted_values_thresholds_and_image_key():
    config = parse_label_config(PREDICTED_VALUES_CONFIG)
    assert config.image_key == "picture" and config.image_name == "img"
    assert config.masks is None
    assert config.aliases == {"cat": "Cat", "kitten": "Cat", "tabby cat": "Cat", "car": "Car"}
    assert config.thresholds == {"box_threshold": 0.05}
    assert config.boxes.score_threshold == 0.2


@pytest.mark.parametrize("xml, message", [
    ("<View><Image name='i' value='$i'/>", "not a valid labeling config"),
    ("", "label_config is missing or not a string"),
    ("<View><RectangleLabels name='l' toName='i'><Label value='a'/></RectangleLabels></View>", "no <Image> or <Video> tag"),
    ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
     "no <RectangleLabels>, <BrushLabels> or <PolygonLabels>"),
    ("<View><Image name='i' value='$i'/><RectangleLabels name='l' toName='i' model_score_threshold='2'>"
     "<Label value='a'/></RectangleLabels></View>", "model_score_threshold of 'l' must be between 0 and 1"),
])
def test_configs_we_cannot_serve_are_clear_errors(xml, message):
    with pytest.raises(BadRequest, match=message):
        parse_label_config(xml)


@pytest.mark.parametrize("value", [[], {}, None, 42, ["<View/>"]])
def test_a_label_config_that_is_not_a_string_is_a_bad_request(value):
    # found by the fuzzer: a list reached the parse cache and raised TypeError (a 500)
    with pytest.raises(BadRequest, match="label_config is missing or not a string"):
        parse_label_config(value)
