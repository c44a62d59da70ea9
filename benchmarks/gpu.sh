#!/usr/bin/env bash
# The GPU benchmarks in one command: serving efficiency, the seed comparison and a batching sweep, each in fp32
# and fp16, plus the precision drift, with full-size architectures (random weights, built on the spot).
#
#   benchmarks/gpu.sh                                   # one GPU, about 6-8 minutes; JSON in benchmarks/results/gpu
#   benchmarks/gpu.sh --device cpu --models tiny --quick --out /tmp/smoke   # the CI smoke run: no GPU, tiny models
#
# On a fresh machine it installs the project from PyPI first (`pip install .`) unless it already imports.
# Each step writes its JSON as soon as it ends, most important first, so a run cut short keeps what finished;
# a failed step is reported and the others still run (the exit status says whether any failed).
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda models=full-vit_t out=benchmarks/results/gpu quick=0 python=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --models) models=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if ! "$python" -c "import serve_app, ray.serve, segment_anything, orjson" 2>/dev/null; then
  "$python" -m pip install -q . || exit 1
fi
if [ "$device" = cuda ] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU visible: run with --device cpu" >&2; exit 1
fi
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "$quick" = 1 ]; then  # sizes for the CPU smoke run: every step runs, none measures anything
  images=2 tasks=2 repeats=1 levels=1,2 batch_sizes=2 precisions=fp32
elif [ "$device" = cpu ]; then
  images=8 tasks=8 repeats=1 levels=1,4 batch_sizes=4,1 precisions=fp32
else
  images=48 tasks=32 repeats=2 levels=1,8,32 batch_sizes=8,1 precisions="fp32 fp16"
fi

failed=()
step() {  # step NAME COMMAND...: run one benchmark, keep going if it fails
  local name=$1; shift
  local started=$SECONDS
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   done in $((SECONDS - started)) s -> $out/$name.json"
  else
    echo "   FAILED after $((SECONDS - started)) s; last lines of $out/$name.log:"; tail -n 15 "$out/$name.log"
    failed+=("$name")
  fi
}

# build the models once, untimed; nothing else can run without them
"$python" -c "from benchmarks.models import model_env; model_env('$models')" || exit 1
if [ "$device" = cuda ]; then
  step precision "$python" -m benchmarks.precision --models "$models" --images 8 --device cuda \
    --precisions fp16,bf16 --out "$out/precision.json"
fi
for precision in $precisions; do
  step "efficiency-$precision" "$python" -m benchmarks.efficiency --models "$models" --images "$images" \
    --device "$device" --precision "$precision" --out "$out/efficiency-$precision.json"
  step "seed-compare-$precision" "$python" -m benchmarks.seed_compare --models "$models" --tasks "$tasks" \
    --repeats "$repeats" --boxes 20 --device "$device" --precision "$precision" --out "$out/seed-compare-$precision.json"
done
for precision in $(echo "$precisions" | tr ' ' '\n' | tac); do  # fp16 first: where batching matters most
  step "batching-sweep-$precision" "$python" -m benchmarks.batching_sweep --models "$models" --levels "$levels" \
    --batch-sizes "$batch_sizes" --device "$device" --precision "$precision" --out "$out/batching-sweep-$precision.json"
done
"$python" -m benchmarks.gpu_summary "$out"

if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
