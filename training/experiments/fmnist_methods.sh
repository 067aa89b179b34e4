#!/usr/bin/env bash
# CPU-sized reproduction of the paper's comparison pattern on real Fashion-MNIST (Debian dataset-fashion-mnist):
# every method trains the same ViT (training/configs/fmnist-bundle-cpu.yaml architecture and views) for the
# same number of steps, then training/evaluate.py measures frozen-feature kNN and a linear probe on the
# official test split. Then the same on a long-tailed training set (Pareto, imbalance 256) for VISReg,
# VISReg* (shape weight 2) and SIGReg. Results: runs/compare/*/eval.json and eval.md.
#   bash training/experiments/fmnist_methods.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
STEPS=${1:-120}
OUT=${OUT:-runs/compare}
CONFIG=training/configs/fmnist-bundle-cpu.yaml
mkdir -p "$OUT"

train_and_eval() {  # name, extra evaluate args, then key=value overrides
  local name=$1 eval_args=$2; shift 2
  local dir="$OUT/$name"
  [ -f "$dir/eval.json" ] && { echo "== $name: done already"; return; }
  echo "== $name: training ($*)"
  "$PY" training/pretrain.py --config "$CONFIG" train.output_dir="$dir" train.max_steps="$STEPS" \
    eval.knn_every=100000 train.checkpoint_every=100000 "$@" > "$dir.train.log" 2>&1
  echo "== $name: evaluating"
  # shellcheck disable=SC2086
  "$PY" training/evaluate.py "$dir/final" --data fmnist --workers 0 $eval_args \
    --out "$dir/eval.json" --markdown "$dir/eval.md" > "$dir.eval.log" 2>&1
  tail -n 20 "$dir/eval.md"
}

for method in visreg sigreg swd vicreg barlow; do
  train_and_eval "$method" "" loss.name="$method"
done
LT="--long-tail-ratio 256"
train_and_eval lt-visreg "$LT" loss.name=visreg data.long_tail.enabled=true
train_and_eval lt-visreg-star "$LT" loss.name=visreg data.long_tail.enabled=true loss.visreg.shape_weight=2.0
train_and_eval lt-sigreg "$LT" loss.name=sigreg data.long_tail.enabled=true
