#!/usr/bin/env bash
# benchmarks/gpu.sh on a lent device machine, its results packed for the trip back (a call returns at most 8
# files from $OUT). From the development machine, once `scripts/gpu_bundle.py` has written .gpu-bundle:
#
#   run(command="bash benchmarks/gpu-device.sh --quick", carry=[".gpu-bundle"], timeout_s=540)   # headline figures
#   run(command="bash benchmarks/gpu-device.sh", carry=[".gpu-bundle"], timeout_s=600)           # everything
#   run(command="bash benchmarks/gpu-device.sh --quick --models full-vit_h", ...)                 # with SAM ViT-H
#
# Returns $OUT/gpu.log (the run's output and the summary tables), $OUT/gpu-results.tar.gz (every JSON and log)
# and $OUT/device.txt (card, driver, CUDA, Python and package versions, for the figures' provenance).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT: the folder a device call returns}"
work=$(mktemp -d) python=${PYTHON:-python3}
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc; free -g | head -2
} >"$OUT/device.txt" 2>&1
status=0
bash benchmarks/gpu.sh "$@" --out "$work/gpu" >"$OUT/gpu.log" 2>&1 || status=$?
"$python" -m pip list 2>/dev/null | grep -iE "^(ray|transformers|torch|segment-anything|av|nvidia-ml-py) " >>"$OUT/device.txt"
tar -czf "$OUT/gpu-results.tar.gz" -C "$work" gpu
tail -n 60 "$OUT/gpu.log"
exit $status
