"""benchmarks/gpu.sh, the GPU benchmark run, smoke-tested on CPU with the tiny models: every step runs end to end
through the real service and writes its JSON (no timing is asserted; docs/performance.md has the numbers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.serve, pytest.mark.timeout(900)]  # every step starts the real service


def test_gpu_script_runs_every_benchmark_on_cpu(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--models", "tiny", "--quick",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    efficiency = json.loads((out / "efficiency-fp32.json").read_text())
    seed = json.loads((out / "seed-compare-fp32.json").read_text())
    sweep = json.loads((out / "batching-sweep-fp32.json").read_text())
    assert efficiency["precision"] == "fp32" and efficiency["models"] == "tiny" and efficiency["efficiency"] > 0
    assert efficiency["graph_load"]["failures"] == 0
    assert seed["speedup"] > 0 and seed["boxes"] == 20 and seed["precision"] == "fp32" and seed["device"] == "cpu"
    assert efficiency["boxes_only"]["graph_load"]["failures"] == 0 and efficiency["boxes_only"]["efficiency"] > 0
    assert efficiency["in_process_one_torch_thread"]["images_per_s"] > 0
    # as shipped at every level, then batching off (set in place by `serve deploy`) above concurrency 1
    assert [(row["max_batch_size"], row["concurrency"]) for row in sweep["rows"]] == [
        ("as shipped", 1), ("as shipped", 2), (1, 2)]
    assert all(r["failures"] == 0 for r in sweep["rows"])
    assert all(mean == 1.0 for mean in sweep["rows"][-1]["mean_batch"].values())
    assert efficiency["efficiency_equal_work"] >= efficiency["efficiency"]  # encoding slows the reference only
    flops = json.loads((out / "flops-fp32.json").read_text())
    assert flops["flops_per_image"]["detector"] > 0 and flops["flops_per_image"]["segmenter"] > 0
    assert flops["matmul_tflops"]["fp32"] > 0 and 0 < flops["service"]["utilisation"]["detector"]["fp32"] < 1
    compact = json.loads((out / "efficiency-fp32-compact.json").read_text())
    assert compact["masks"] == "compact" and efficiency["masks"] == "noise" and compact["graph_load"]["failures"] == 0
    # (the tiny SAM's masks are not compacted by it: tests/test_compact_masks.py checks MobileSAM's)
    assert not (out / "batching-sweep-fp32-compact.json").exists()
    busy = json.loads((out / "gpu-busy-fp32-compact.json").read_text())
    assert busy["tasks"] == 4 and busy["failures"] == 0 and busy["gpu"]["available"] is False  # no GPU: says why
    timings = json.loads((out / "suite-timings.json").read_text())
    assert timings["failed"] == {} and timings["phases_s"]["fp32 service"] > 0
    compiled = json.loads((out / "compiled-encoders.json").read_text())
    assert [(row["model"], row["mode"], row["compiled"]) for row in compiled["rows"]] == [("tiny", "on", True)]
    assert "the segmenter's image encoder per image on cpu" in run.stdout
    assert "| fp32 |" in run.stdout  # the summary table for docs/performance-history.md
