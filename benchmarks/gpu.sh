#!/usr/bin/env bash
# The GPU benchmarks in one command, with full-size architectures (random weights, built on the spot):
# - benchmarks/gpu_suite.py, one service per precision (fp32, fp16): serving efficiency (also against bare models
#   doing the same output work), FLOP utilisation per model, GPU busy (NVML) through 500 Retrieved tasks (fp32),
#   the seed comparison and a batching sweep (see its docstring);
# - the service's own ceiling on the node's cores (null models), the segmenter's pixel work on host and GPU, its
#   image encoder eager against torch.compile (COMPILE_ENCODERS);
# - the precision drift, and video frames/s (detector, tracker).
#
#   benchmarks/gpu.sh                                   # one GPU, under 8 minutes; JSON in benchmarks/results/gpu
#   benchmarks/gpu.sh --quick                           # one GPU, the headline figures (fp32 alone), about 4 minutes
#   benchmarks/gpu.sh --device cpu --models tiny --quick --out /tmp/smoke   # the CI smoke run: no GPU, tiny models
#
# What the environment lacks it installs first: from .gpu-bundle (scripts/gpu_bundle.py; a lent GPU machine
# reaches no package index, so the device call carries it) or else from PyPI (`pip install .`).
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
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$python" -c "import ray.serve, segment_anything, orjson, label_studio_sdk" 2>/dev/null; then
  if [ -f .gpu-bundle/wheels.tar.xz ]; then  # a lent GPU machine reaches no index: scripts/gpu_bundle.py made this
    wheels=$(mktemp -d)  # Python's tarfile: the image may lack the xz tool
    "$python" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
      .gpu-bundle/wheels.tar.xz "$wheels" || exit 1
    # into the image's environment; where that is read-only, beside it on PYTHONPATH
    if ! "$python" -m pip install -q --no-index --no-deps --no-compile "$wheels"/*.whl; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site "$wheels"/*.whl || exit 1
      export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
    fi
    rm -rf "$wheels"
  else
    "$python" -m pip install -q . || exit 1
  fi
fi
if [ "$device" = cuda ] && ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU visible: run with --device cpu" >&2; exit 1
fi
mkdir -p "$out"

full=1
if [ "$quick" = 1 ] && [ "$device" = cpu ]; then  # the CPU smoke run: every phase runs, none measures anything
  sizes=(--quick) precisions=fp32,fp32-compact full=0
elif [ "$quick" = 1 ]; then  # the headline figures, fp32 alone: no fp16 service, drift, low levels or video
  sizes=(--images 48 --tasks 32 --repeats 1 --levels 32 --busy-tasks 200) precisions=fp32,fp32-compact full=0
elif [ "$device" = cpu ]; then
  sizes=(--images 8 --tasks 8 --repeats 1 --levels 1,4 --busy-tasks 8) precisions=fp32
else
  sizes=(--images 48 --tasks 32 --repeats 2 --levels 1,8,32) precisions=fp32,fp32-compact,fp16
fi

started=$SECONDS
failed=()
# build the models once, untimed; nothing else can run without them
"$python" -c "from benchmarks.models import model_env; model_env('$models')" || exit 1
echo "models built in $((SECONDS - started)) s"
if [ "$device" = cuda ] && [ "$full" = 1 ]; then  # in-process, cheap: fp16 and bf16 against fp32 on the same images
  echo "== precision drift"
  "$python" -m benchmarks.precision --models "$models" --images 6 --device cuda --precisions fp16,bf16 \
    --out "$out/precision.json" >"$out/precision.log" 2>&1 || { tail -n 15 "$out/precision.log"; failed+=(precision); }
fi
# efficiency, seed comparison and batching sweep per precision, sharing each service between them
"$python" -m benchmarks.gpu_suite --models "$models" --device "$device" --precisions "$precisions" "${sizes[@]}" \
  --out "$out" 2>&1 | tee "$out/suite.log" || failed+=(suite)
if [ "$device" = cuda ]; then  # the service's own ceiling on this node's cores: null models, one and two ingresses
  for replicas in 1 2; do
    echo "== null ceiling, $replicas ingress replica(s)"
    "$python" -m benchmarks.null_ceiling --tasks 400 --concurrency 16 --ingress-replicas "$replicas" \
      --out "$out/null-ceiling-$replicas.json" >"$out/null-ceiling-$replicas.log" 2>&1 \
      || { tail -n 15 "$out/null-ceiling-$replicas.log"; failed+=(null-ceiling); }
  done
fi
if [ "$device" = cuda ]; then  # in-process: the segmenter's pixel work on the host's one thread against the GPU
  echo "== segmenter pixels"
  "$python" -m benchmarks.segmenter_pixels --device cuda $([ "$full" = 1 ] || echo --quick) \
    --out "$out/segmenter-pixels.json" >"$out/segmenter-pixels.log" 2>&1 \
    || { tail -n 15 "$out/segmenter-pixels.log"; failed+=(segmenter-pixels); }
fi
# in-process: the segmenter's image encoder eager against torch.compile (COMPILE_ENCODERS), the set's SAM
case "$models" in *vit_h) sam=vit_h ;; *vit_b) sam=vit_b ;; tiny) sam=tiny ;; *) sam=vit_t ;; esac
if [ "$device" = cuda ] && [ "$full" = 1 ]; then compile_args=(--precisions fp32,fp16 --modes on,cudagraphs --images 8 --repeats 2)
elif [ "$device" = cuda ]; then compile_args=(--precisions fp32 --modes on --images 8 --repeats 2)
else compile_args=(--precisions fp32 --modes on --images 1); fi
echo "== compiled encoders"
"$python" -m benchmarks.compiled_encoders --device "$device" --models "$sam" "${compile_args[@]}" \
  --out "$out/compiled-encoders.json" >"$out/compiled-encoders.log" 2>&1 \
  || { tail -n 15 "$out/compiled-encoders.log"; failed+=(compiled-encoders); }
if [ "$device" = cuda ] && [ "$full" = 1 ]; then  # last, as the least needed: video frames/s, full-size models
  echo "== video"
  "$python" -m benchmarks.video --device cuda --track-fps 10 --short-s 20 --long-s 60 --full-size --tracker \
    --tracker-long-s 60 --out "$out/video.json" >"$out/video.log" 2>&1 || { tail -n 15 "$out/video.log"; failed+=(video); }
fi
echo "gpu.sh: $((SECONDS - started)) s in all"
"$python" -m benchmarks.gpu_summary "$out"

if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
