import asyncio

import pytest

from serve_app.cli import main
from serve_app.prelabel import PrelabelOptions, prompt_context, versioned
from serve_app.label_studio.retries import TransientError, with_retries


def test_the_prompt_is_part_of_the_version():
    assert versioned("gs:dino", "") == "gs:dino"
    a, b = versioned("gs:dino", "cats"), versioned("gs:dino", "house")
    assert a.startswith("gs:dino+prompt:") and a != b and a == versioned("gs:dino", "cats")
    assert "," not in a  # Label Studio lists a task's versions comma-separated


def test_context_carries_prompt_and_thresholds_like_the_labeling_ui():
    options = PrelabelOptions("http://ls", "k", 1, prompt="a cat_cats", box_threshold=0.4)
    context = prompt_context(options)
    assert context["result"][0] == {"type": "textarea", "from_name": "prompt", "to_name": "image",
                                    "value": {"text": ["a cat_cats"]}}
    assert context["result"][1]["value"] == {"number": 0.4} and context["result"][1]["from_name"] == "box_threshold"
    assert prompt_context(PrelabelOptions("http://ls", "k", 1)) is None


def test_transient_errors_are_retried_then_given_up(monkeypatch):
    delays = []

    async def fake_sleep(seconds):
        delays.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientError("503", retry_after_s=7 if len(attempts) == 2 else None)
        return "ok"

    assert asyncio.run(with_retries(flaky, retries=5, what="t")) == "ok"
    assert delays == [1.0, 7]  # exponential backoff, or what Retry-After says

    async def always():
        raise TransientError("down")

    with pytest.raises(TransientError):
        asyncio.run(with_retries(always, retries=2, what="t"))


@pytest.mark.parametrize("argv, message", [
    (["prelabel", "--project", "1", "--label-studio-url", "http://ls", "--api-key", "k", "--box-threshold", "2"],
     "--box-threshold must be between 0 and 1"),
    (["prelabel", "--project", "1", "--label-studio-url", "", "--api-key", ""], "set --label-studio-url"),
])
def test_bad_arguments_are_explained(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
