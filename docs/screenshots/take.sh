#!/usr/bin/env bash
# Screenshots of the MLflow UI for a finished study, in headless Chromium (Debian's
# `chromium` package). Usage:
#   docs/screenshots/take.sh TRACKING_URI EXPERIMENT_ID PARENT_RUN_ID CHILD_RUN_ID [OUT_DIR]
# e.g. with the ids in a study's study.json and the MLflow server it was logged to.
# Every page carries ?workflowType=machine_learning: MLflow 3's UI otherwise opens an
# experiment on its GenAI pages (see smile_ray/orchestration/tracking.py). On a busy machine
# the metric charts may still be loading when the shot is taken: run it again.
set -euo pipefail
uri=${1:?tracking URI, e.g. http://127.0.0.1:5000}
exp=${2:?experiment id}
parent=${3:?parent run id}
child=${4:?child run id}
out=${5:-docs/screenshots}
view="?workflowType=machine_learning"
shot() {  # NAME URL
  profile=$(mktemp -d)
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" --window-size=1500,950 \
    --virtual-time-budget=${BUDGET_MS:-20000} --screenshot="$out/$1.png" "$2" >/dev/null 2>&1
  rm -rf "$profile"
  echo "$out/$1.png  <-  $2"
}
mkdir -p "$out"
shot experiment "$uri/#/experiments/$exp$view"
shot parent_run "$uri/#/experiments/$exp/runs/$parent$view"
shot parent_artifacts "$uri/#/experiments/$exp/runs/$parent/artifacts$view"
shot child_metrics "$uri/#/experiments/$exp/runs/$child/model-metrics$view"
