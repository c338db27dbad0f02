#!/usr/bin/env bash
# Train the models behind docs/detection.md and docs/training.md with the default settings:
# the striped-T-shirt backdoor and clean models over several seeds, and the synthetic attacks of
# make_synthetic_attacks.py. Two trainings run at once, one thread each (this small network
# gains nothing from a second thread). Each writes OUT/<attack>_s<seed>.{safetensors,json,log}.
#
# Usage: bash research/train_zoo.sh OUT [JOBS]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: train_zoo.sh OUT [JOBS]}
JOBS=${2:-2}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
[ -f "$OUT/synth.json" ] || "$PY" research/make_synthetic_attacks.py "$OUT/synth.json"
{
  for s in 0 1 2; do echo "stripet $s"; done
  for s in 0 1 2 3 4; do echo "none $s"; done
  for a in darktrouser brightbag darksneaker texturedshirt; do echo "$a 0"; done
} | OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 xargs -P "$JOBS" -L 1 bash -c '
  attack=$0; seed=$1; out="'"$OUT"'/${attack}_s${seed}"
  [ -f "$out.safetensors" ] && exit 0
  extra=(); case $attack in stripet|none) ;; *) extra=(--attack-file "'"$OUT"'/synth.json");; esac
  start=$(date +%s)
  "'"$PY"'" -m soda_backdoor train --dataset fmnist --attack "$attack" "${extra[@]}" --arch cnn --seed "$seed" \
      --out "$out.safetensors" --json "$out.json" --quiet > "$out.log" 2>&1
  echo "$attack seed $seed: $(( $(date +%s) - start )) s"
'
