#!/usr/bin/env bash
# Every GPU figure of the performance issue, in one call on a lent GPU machine (it needs
# torch, torchvision, pillow and pyyaml; no Ray, no MLflow: the scripts drive the core).
#
#   bash benchmarks/gpu.sh              # on the device: run(command="bash benchmarks/gpu.sh", timeout_s=600)
#   SMOKE=1 bash benchmarks/gpu.sh      # the same steps, tiny, on this machine's CPU (checks the plumbing)
#
# Steps, each under its own time limit so that one that hangs (a compile) leaves the
# others their time. The limits add up to 520 s, the preamble (one torch import) about
# 10 s: the script ends within a call's 600 s cap with room to spare.
#   files     960 generated 500x375 JPEGs, written once for steps 5 and 6         20 s
#   1 defaults   ResNet-50, 224 px, batch 48, l2 and smile, synthetic batches, the
#                CUDA defaults (bf16 autocast, channels_last, cudnn.benchmark, fused
#                SGD): the issue's img/s goals (l2 >= 4,500, smile >= 3,400)        50 s
#   2 batch128   the same at batch 128 (img/s where the GPU is fuller)              45 s
#   3 fp32       1 in fp32 without channels_last: what the defaults bring           40 s
#   4 stall      checkpoint stall of a ResNet-50 SMILE run (about 290 MB): on the
#                training thread against the background writer                     40 s
#   5 files_cpu  1 through the real file pipeline, decode=cpu (PIL in DataLoader
#                workers, uint8 batches pinned and copied, normalised on the device),
#                each variant timed in one block after a drain                      65 s
#   6 files_dev  5 with decode=device (workers read bytes; nvJPEG batched decode,
#                resize/crop/flip on the GPU): whether it should become the default 55 s
#   7 compile    1 with compile=true (default mode; compile time in the warm-up)    80 s
#   8 autotune   l2 compiled with mode max-autotune-no-cudagraphs                   70 s
#   9 cudagraphs l2 compiled with mode reduce-overhead (CUDA graphs)                55 s
# The compiles share TORCHINDUCTOR_CACHE_DIR (under /tmp: the cache is thousands of
# files, and at most 8 files come back from the device machine). Everything goes to
# ${OUT:-gpu-out}/gpu.txt as it happens, the figures also to figures.json beside it (one
# key per step), rewritten after each variant: a step stopped by its limit keeps what it
# measured.
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/smile-ray-inductor-cache}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
files=$(mktemp -d /tmp/smile-ray-gpu-files.XXXXXX)
trap 'rm -rf "$files"' EXIT

if [ "${SMOKE:-0}" = 1 ]; then
  model=(--backbone resnet18 --image-size 32 --batch-size 4 --device cpu)
  big=(--backbone resnet18 --image-size 32 --batch-size 8 --device cpu)
  tiny=(--backbone digits_cnn --image-size 32 --batch-size 4 --device cpu)  # compiles in seconds on a CPU
  short=(--steps 2 --rounds 1 --warmup 1)
  stall=(--backbone resnet18 --device cpu --repeats 1)
  images=40
  limit=150
else
  model=(--backbone resnet50 --image-size 224 --batch-size 48 --device cuda)
  big=(--backbone resnet50 --image-size 224 --batch-size 128 --device cuda)
  tiny=("${model[@]}")
  short=(--steps 30 --rounds 3 --warmup 10)
  stall=(--device cuda --repeats 3)
  images=960
  limit=0
fi

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  [ "$limit" != 0 ] && seconds=$limit
  echo "== $name (limit $seconds s): $*" | tee -a "$out/gpu.txt"
  local t0=$SECONDS
  timeout -k 5 "$seconds" "$@" >>"$out/gpu.txt" 2>&1
  echo "[$name: exit $?, $((SECONDS - t0)) s]" | tee -a "$out/gpu.txt"
}

{
  date -u
  git log -1 --format='commit %h %s' 2>/dev/null
  nvidia-smi -L 2>/dev/null
  nproc
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >>"$out/gpu.txt" 2>&1

step files 20 "$py" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from input_pipeline import write_tree; write_tree(Path('$files'), $images, 10, 500, 375); print('wrote $images JPEGs')"
step defaults 50 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --synthetic "${short[@]}" \
  --json "$out/figures.json" --json-key defaults
step batch128 45 "$py" benchmarks/step_time.py "${big[@]}" --variants l2,smile --synthetic "${short[@]}" \
  --json "$out/figures.json" --json-key batch128
step fp32 40 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --synthetic "${short[@]}" \
  --precision fp32 --channels-last false --json "$out/figures.json" --json-key fp32
step stall 40 "$py" benchmarks/checkpoint_stall.py "${stall[@]}"
step files_cpu 65 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --files "$files" --decode cpu \
  "${short[@]}" --json "$out/figures.json" --json-key files_cpu
step files_dev 55 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --files "$files" --decode device \
  "${short[@]}" --json "$out/figures.json" --json-key files_dev
step compile 80 "$py" benchmarks/step_time.py "${tiny[@]}" --variants l2,smile --synthetic --compile \
  "${short[@]}" --json "$out/figures.json" --json-key compile
step autotune 70 "$py" benchmarks/step_time.py "${tiny[@]}" --variants l2 --synthetic --compile \
  --compile-mode max-autotune-no-cudagraphs "${short[@]}" --json "$out/figures.json" --json-key autotune
step cudagraphs 55 "$py" benchmarks/step_time.py "${tiny[@]}" --variants l2 --synthetic --compile \
  --compile-mode reduce-overhead "${short[@]}" --json "$out/figures.json" --json-key cudagraphs
echo "all steps: $SECONDS s" | tee -a "$out/gpu.txt"
