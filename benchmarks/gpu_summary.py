"""The tables of docs/performance-history.md from a benchmarks/gpu.sh run's JSON files.

    python -m benchmarks.gpu_summary benchmarks/results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def runs(folder: Path, kind: str) -> list[str]:
    """The runs (fp32, fp32-compact, fp16, ...) that wrote a `kind`-RUN.json, fp32 first."""
    found = [path.stem[len(kind) + 1:] for path in folder.glob(f"{kind}-*.json")]
    return sorted(found, key=lambda run: (not run.startswith("fp32"), run))


def summary(folder: Path) -> str:
    lines = []
    first = next((json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))), None)
    if first is None:
        return f"no results in {folder}"
    lines.append(f"machine: {first.get('machine')}, GPU: {first.get('gpu')}; torch {first.get('torch')}, "
                 f"ray {first.get('ray')}, transformers {first.get('transformers')}")
    lines += ["", "| precision | in-process best (img/s) | service (img/s) | efficiency | efficiency, equal work | "
              "efficiency, boxes only | seed (tasks/s) | service (tasks/s) | speedup |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for precision in runs(folder, "efficiency"):
        efficiency, seed = load(folder, f"efficiency-{precision}"), load(folder, f"seed-compare-{precision}")
        if not (efficiency or seed):
            continue
        e = efficiency or {}
        s = seed or {}
        best = max(e.get("in_process_images_per_s", {}).values(), default=None)
        boxes_only = e.get("boxes_only", {}).get("efficiency")
        lines.append(f"| {precision} | {best} | {e.get('graph_images_per_s')} | {e.get('efficiency')} | "
                     f"{e.get('efficiency_equal_work')} | {boxes_only} | "
                     f"{s.get('seed_tasks_per_s')} | {s.get('graph_tasks_per_s')} | {s.get('speedup')} |")
    for precision in runs(folder, "batching-sweep"):
        sweep = load(folder, f"batching-sweep-{precision}")
        if not sweep:
            continue
        lines += ["", f"batching sweep, {precision}:", "",
                  "| max_batch_size | concurrency | requests/s | p50 ms | p95 ms | mean batch |", "| --- | --- | --- | --- | --- | --- |"]
        for row in sweep["rows"]:
            lines.append(f"| {row['max_batch_size']} | {row['concurrency']} | {row.get('requests_per_s')} | "
                         f"{row.get('p50_ms')} | {row.get('p95_ms')} | {row.get('mean_batch')} |")
    for precision in runs(folder, "flops"):
        flops = load(folder, f"flops-{precision}")
        if not flops:
            continue
        rates = ", ".join(f"{p} {r} TFLOP/s" for p, r in flops["matmul_tflops"].items())
        lines += ["", f"FLOP utilisation, {precision} (matmul rate measured: {rates}):", "",
                  "| model | GFLOP/image | in-process img/s | in-process utilisation | service utilisation | "
                  "GPU waiting in one in-process batch |", "| --- | --- | --- | --- | --- | --- |"]
        for name, alone in flops["in_process"].items():  # segmenter_pixels_on_host: the segmenter, as before
            count = flops["flops_per_image"].get(name.split("_")[0], 0)
            service = flops.get("service", {}).get("utilisation", {}).get(name)
            split = alone.get("one_batch", {})
            waiting = f"{split['gpu_waiting_ms']} of {split['wall_ms']} ms" if split else "-"
            lines.append(f"| {name} | {count / 1e9:.1f} | {alone.get('images_per_s')} | {alone.get('utilisation')} | "
                         f"{service} | {waiting} |")
    busy = next((load(folder, f"gpu-busy-{run}") for run in runs(folder, "gpu-busy")), None)
    if busy:
        during = "; ".join(f"{name} {r.get('mean_percent', r.get('why'))}" for name, r in busy["during"].items())
        lines += ["", f"GPU busy (NVML), {busy['precision']}, {busy.get('masks')} masks: {busy['tasks']} tasks in {busy['requests']} Retrieves, "
                  f"{busy['concurrency']} at once: {busy['tasks_per_s']} tasks/s, {busy['gpu']}; mean % during "
                  f"the other loads: {during}"]
    ceilings = [c for c in (load(folder, f"null-ceiling-{n}") for n in (1, 2)) if c]
    if ceilings:
        lines += ["", "the service's own ceiling on this node (null models, 20 boxes and compact masks a task): "
                  + "; ".join(f"{c['ingress_replicas']} ingress replica(s) {c['tasks_per_s']} tasks/s, "
                              f"{c['cpu_ms_per_task_total']} ms CPU a task" for c in ceilings)]
    pixels = load(folder, "segmenter-pixels")
    if pixels:
        lines += ["", f"the segmenter's pixel work per image (resize, up-sampling, RLE), ms: host on one thread / "
                      f"{pixels['device']} / host CPU left beside it:", ""]
        for row in pixels["rows"]:
            lines.append(f"- {row['masks']} masks, {row['boxes']} at {row['image'][1]}×{row['image'][0]}: "
                         f"{row['host_total_ms']} / {row['device_total_ms']} / {row['host_cpu_ms_left']} "
                         f"(host {row['host_one_thread']}; device {row['device']})")
    compiled = load(folder, "compiled-encoders")
    if compiled:
        lines += ["", f"the segmenter's image encoder per image on {compiled['device']}, eager / torch.compile "
                      f"(COMPILE_ENCODERS), ms:", ""]
        for row in compiled["rows"]:
            lines.append(f"- {row['model']} {row['precision']} {row.get('mode', 'on')}: {row['eager_ms_per_image']} / "
                         f"{row['compiled_ms_per_image']} ({row['speed_up']}×; compiled at start-up in "
                         f"{row['start_up_compile_s']} s; mask pixels differing {row['mask_pixels_differing']:.2g})")
    drift = load(folder, "precision")
    if drift:
        lines += ["", "precision drift against fp32 (in-process):", ""]
        for run in drift["runs"]:
            lines.append(f"- {run['precision']}: speedup {run.get('speedup_vs_fp32')}, {run.get('drift', '')}"
                         f"{run.get('skipped', '')}")
    timings = load(folder, "suite-timings")
    if timings:
        lines += ["", f"benchmarks.gpu_suite: {timings['total_s']} s; by phase: "
                  + ", ".join(f"{name} {s} s" for name, s in timings["phases_s"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")))
