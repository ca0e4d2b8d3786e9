#!/usr/bin/env bash
# Every GPU figure of the performance issue, in one call on a lent GPU machine (it needs
# torch, torchvision, pillow and pyyaml; no Ray, no MLflow: the scripts drive the core).
#
#   bash benchmarks/gpu.sh              # on the device: run(command="bash benchmarks/gpu.sh", timeout_s=600)
#   SMOKE=1 bash benchmarks/gpu.sh      # the same steps, tiny, on this machine's CPU (checks the plumbing)
#
# Steps, each under its own time limit so that one that hangs (a compile) leaves the
# others their time; about 9 minutes at most, usually far less:
#   1. ResNet-50, 224 px, batch 48, l2 and smile, synthetic batches, the CUDA defaults
#      (bf16 autocast, channels_last, cudnn.benchmark, fused SGD): the issue's img/s goals
#      (l2 >= 4,500, smile >= 3,400);
#   2. the same in fp32 without channels_last: what the defaults bring;
#   3. the same as 1 through the real file pipeline (960 generated 500x375 JPEGs decoded
#      and augmented by DataLoader workers, uint8 batches pinned and copied, normalised
#      on the device): whether input keeps the GPU fed;
#   4. checkpoint stall of a ResNet-50 SMILE run (about 290 MB): on the training thread
#      against the background writer;
#   5. 1 with compile=true (torch.compile of student and teacher), compile time included
#      in its warm-up.
# Everything goes to ${OUT:-gpu-out}/gpu.txt, the figures also as JSON beside it (at most
# 8 files come back from the device machine).
set -u
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if [ "${SMOKE:-0}" = 1 ]; then
  model=(--backbone resnet18 --image-size 32 --batch-size 4 --device cpu)
  short=(--steps 2 --rounds 1 --warmup 1 --file-images 40)
  stall=(--backbone resnet18 --device cpu --repeats 1)
  limit=120
else
  model=(--backbone resnet50 --image-size 224 --batch-size 48 --device cuda)
  short=(--steps 30 --rounds 3 --warmup 10)
  stall=(--device cuda --repeats 3)
  limit=0
fi

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  [ "$limit" != 0 ] && seconds=$limit
  echo "== $name: $*" | tee -a "$out/gpu.txt"
  local t0=$SECONDS
  timeout "$seconds" "$@" >>"$out/gpu.txt" 2>&1
  echo "[$name: exit $?, $((SECONDS - t0)) s]" | tee -a "$out/gpu.txt"
}

{
  date -u
  git log -1 --format='commit %h %s' 2>/dev/null
  nvidia-smi -L 2>/dev/null
  "$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} >>"$out/gpu.txt" 2>&1

step defaults 90 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --synthetic "${short[@]}" \
  --json "$out/defaults.json"
step fp32 90 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --synthetic "${short[@]}" \
  --precision fp32 --channels-last false --json "$out/fp32.json"
step files 150 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --files generate "${short[@]}" \
  --json "$out/files.json"
step checkpoint_stall 90 "$py" benchmarks/checkpoint_stall.py "${stall[@]}"
step compile 180 "$py" benchmarks/step_time.py "${model[@]}" --variants l2,smile --synthetic --compile \
  "${short[@]}" --json "$out/compile.json"
echo "all steps: $SECONDS s" | tee -a "$out/gpu.txt"
