"""The other model families through the real service over HTTP: an OWLv2 detector and a transformers SAM 2.1
segmenter (saved as the hub saves it, `sam2_video`) answer Label Studio's captured bodies with valid results,
and a click after a text prompt on the same image reuses the image's embedding."""

from __future__ import annotations

import pytest

from serve_app.tiny_models.grounding_dino_sam import make_tiny_sam_family
from serve_app.tiny_models.owlv2_omdet import make_tiny_owlv2
from tests.imaging import pattern, png_bytes
from tests.serve_process import ServeProcess
from tests.service_checks import click_after_text_is_a_cache_hit, retrieve_is_valid

pytestmark = pytest.mark.serve

SIZES = {"fam-a.png": (320, 240), "fam-b.png": (200, 300)}  # width, height


@pytest.fixture(scope="module")
def service(image_dir, tmp_path_factory):
    for seed, (name, (width, height)) in enumerate(SIZES.items()):
        (image_dir / name).write_bytes(png_bytes(pattern(height, width, seed=40 + seed)))
    sam2 = make_tiny_sam_family(tmp_path_factory.mktemp("sam2.1-tiny"), "sam2_video", seed=2)
    owlv2 = make_tiny_owlv2(tmp_path_factory.mktemp("owlv2-tiny"), seed=2)
    env = {"DETECTOR_MODEL": str(owlv2), "SEGMENTER_MODEL": str(sam2),
           "IMAGE_HOST_ALLOWLIST": "127.0.0.1", "BOX_THRESHOLD": "0", "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"}
    process = ServeProcess(env, tmp_path_factory.mktemp("serve")).start()
    yield process
    process.stop()


def test_retrieve_predictions_gives_valid_boxes_and_masks(service, image_server):
    payload = retrieve_is_valid(service, [(f"{image_server}/{name}", size) for name, size in SIZES.items()], 5)
    assert payload["model_version"] == "grounded-serve:owlv2-tiny0+sam2.1-tiny0"  # the models' directories name it


def test_a_click_after_a_text_prompt_on_the_same_image_reuses_its_embedding(service, image_server):
    click_after_text_is_a_cache_hit(service, f"{image_server}/fam-b.png", SIZES["fam-b.png"])
