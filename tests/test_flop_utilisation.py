"""benchmarks.flop_utilisation's in-process side, on the tests' tiny models and the CPU: what a GPU run's
flops-R.json will hold, including the segmenter timed with its pixel work on the host beside the device path
(on a GPU both run; here the device path is forced on, since a CPU segmenter keeps its pixels on the host)."""

import json

from benchmarks.flop_utilisation import report, with_service
from benchmarks.gpu_summary import summary
from benchmarks.pipeline import load_models
from serve_app.settings import Settings
from tests.imaging import pattern


def test_the_report_times_each_model_and_the_segmenter_both_ways(tiny_models, tmp_path):
    settings = Settings.load(env={"GROUNDING_DINO_MODEL": str(tiny_models["grounding_dino"]), "USE_SAM": "true",
                                  "SAM_CHECKPOINT": str(tiny_models["sam"]), "DEVICE": "cpu", "BOX_THRESHOLD": "0",
                                  "TEXT_THRESHOLD": "0", "MAX_DETECTIONS": "5"})
    detector, segmenter = load_models(settings)
    segmenter.pixels_on_device = True  # as on a GPU
    result = with_service(report(detector, segmenter, settings, [pattern(120, 160, seed=s) for s in range(4)], 2,
                                 quick=True), service_images_per_s=1.0)
    assert segmenter.pixels_on_device  # restored after the host-side timing
    alone = result["in_process"]
    assert set(alone) == {"detector", "segmenter", "segmenter_pixels_on_host"}
    assert all(row["images_per_s"] > 0 and row["utilisation"]["fp32"] > 0 for row in alone.values())
    assert result["flops_per_image"]["boxes"] == 5 and set(result["service"]["utilisation"]) == {"detector",
                                                                                                "segmenter"}
    (tmp_path / "flops-fp32.json").write_text(json.dumps(result))
    table = summary(tmp_path)
    assert "| segmenter_pixels_on_host |" in table and "| detector |" in table
