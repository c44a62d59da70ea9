import pytest

from serve_app.ingress.errors import BadRequest
from serve_app.ingress.label_config import parse_label_config
from serve_app.ingress.prompts import Phrase, parse_prompt, prompt_from_labels
from tests.configs import BOXES_ONLY_ONE_LABEL, PREDICTED_VALUES_CONFIG, SEED_CONFIG

SEED = parse_label_config(SEED_CONFIG)
PREDICTED = parse_label_config(PREDICTED_VALUES_CONFIG)


def parse(text, config=SEED, max_chars=2000, max_phrases=32):
    return parse_prompt(text, config, max_chars, max_phrases)


def test_suffix_names_the_label():
    prompt = parse("brown cat_cats. house")
    assert prompt.phrases == (Phrase("brown cat", "cats"), Phrase("house", "house"))
    assert prompt.warnings == ()


def test_suffix_and_plain_phrases_match_case_insensitively():
    assert parse("Big Shed_HOUSE. CATS").phrases == (Phrase("big shed", "house"), Phrase("cats", "cats"))


def test_predicted_values_map_to_their_label():
    prompt = parse("kitten. tabby cat. car", PREDICTED)
    assert [p.label for p in prompt.phrases] == ["Cat", "Cat", "Car"]


def test_unmatched_phrases_are_dropped_with_a_warning():
    prompt = parse("dog. house. tree_trees")
    assert prompt.phrases == (Phrase("house", "house"),)
    assert len(prompt.warnings) == 2
    assert "'dog' matches no label" in prompt.warnings[0]
    assert "no label 'trees'" in prompt.warnings[1]


def test_single_label_configs_take_any_phrase():
    config = parse_label_config(BOXES_ONLY_ONE_LABEL)
    assert parse("red car. person", config).phrases == (Phrase("red car", "object"), Phrase("person", "object"))


@pytest.mark.parametrize("text, message", [
    ("", "the prompt is empty"),
    (" . .. ", "the prompt is empty"),
    ("cats" * 2500, "10000 characters; the limit is 2000"),
])
def test_bad_prompts(text, message):
    with pytest.raises(BadRequest, match=message):
        parse(text)


def test_phrase_cap():
    with pytest.raises(BadRequest, match="limit is 2"):
        parse("a_cats. b_cats. c_cats", max_phrases=2)


def test_no_prompt_uses_labels_and_predicted_values():
    prompt = prompt_from_labels(PREDICTED, max_phrases=32)
    assert prompt.source == "labels"
    assert prompt.phrases == (Phrase("cat", "Cat"), Phrase("kitten", "Cat"), Phrase("tabby cat", "Cat"),
                              Phrase("car", "Car"))
