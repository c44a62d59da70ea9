"""scripts/gpu_bundle.py chooses what a lent GPU machine must be carried: its choices, without downloading."""

import importlib.util
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "scripts" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def test_the_image_keeps_what_it_has_unless_a_carried_package_refuses_its_version():
    needed = {"ray": "2.60.0", "huggingface-hub": "2.5.0", "numpy": "2.2.6", "opencv-python-headless": "4.12",
              "pillow": "12.0", "torch": "2.14.1", "black": "26.1"}
    wanted_by = {
        "ray": [("grounded-serve", Requirement("ray[serve]>=2.60"))],
        "transformers": [("grounded-serve", Requirement("transformers>=5"))],
        "huggingface-hub": [("transformers", Requirement("huggingface-hub>=2.4"))],
        # the image's own opencv is not ours: our opencv's pin on numpy is not the image's business
        "numpy": [("opencv-python-headless", Requirement("numpy<2.3"))],
        "pillow": [("grounded-serve", Requirement("pillow>=11"))],
    }
    needed["transformers"] = "5.25.0"
    present = {"huggingface-hub": "1.33.0", "numpy": "2.5.2", "opencv-python-headless": None, "pillow": None,
               "torch": "2.11.0", "transformers": "5.17.0"}
    carried = gpu_bundle.carry(needed, wanted_by, present)
    assert carried == {"ray": "2.60.0", "transformers": "5.25.0", "huggingface-hub": "2.5.0"}


def test_the_closure_follows_extras_and_markers_of_the_installed_project():
    needed, wanted_by = gpu_bundle.closure("grounded-serve", "3.12")
    assert {"ray", "fastapi", "uvicorn", "starlette", "segment-anything", "label-studio-sdk", "av", "kernels"} <= set(needed)
    assert "pytest" not in needed  # the test extra is not run-time
    assert any(source == "ray" for source, _ in wanted_by["uvicorn"])  # ray[serve]'s extra followed


def test_the_image_list_parses_names_and_known_versions():
    present = gpu_bundle.image_packages(gpu_bundle.IMAGE_PACKAGES)
    assert present["torch"] == "2.11.0" and present["transformers"] == "5.17.0"
    assert "ray" not in present and present["msgpack"] is None
