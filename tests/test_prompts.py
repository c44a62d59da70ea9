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
    assert len(prompt.warnings) == 3
    assert "'dog' matches no label" in prompt.warnings[0]
    assert "no label 'trees'" in prompt.warnings[1]
    assert prompt.warnings[2] == "labels in the config: cats, house"


def test_warnings_are_deduplicated_and_bounded_whatever_the_config_and_prompt():
    labels = "".join(f'<Label value="label{i}"/>' for i in range(2000))
    config = parse_label_config(f'<View><Image name="image" value="$image"/>'
                                f'<RectangleLabels name="l" toName="image">{labels}</RectangleLabels></View>')
    text = ". ".join(["dog"] * 200 + [f"thing{i}" for i in range(300)] + ["x\ud800"])
    prompt = parse_prompt(text, config, max_chars=10_000, max_phrases=32)
    assert prompt.phrases == ()
    assert sum("'dog'" in w for w in prompt.warnings) == 1  # a phrase typed 200 times is named once
    assert len(prompt.warnings) == 12 and "and 292 more phrases dropped" in prompt.warnings[10]
    assert prompt.warnings[-1].endswith("and 1950 more") and prompt.warnings[-1].count("label") == 51
    assert sum(len(w) for w in prompt.warnings) < 5_000
    assert all(w.encode("utf-8") for w in prompt.warnings)  # user text is written with repr: no lone surrogate


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
