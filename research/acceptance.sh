#!/usr/bin/env bash
# The acceptance runs of issue #2, exactly as the issue words them: for seeds 0, 1, 2 train the
# default `cnn` on real Fashion-MNIST with the striped-T-shirt backdoor and without one, time
# it, then evaluate it on the striped-T-shirt attack. Trainings run one after another (two
# threads each, as on the 2-core CI machine). Prints one line per model; keeps the model,
# evaluation JSON and log under OUT.
#
# Usage: bash research/acceptance.sh OUT [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: acceptance.sh OUT [SEEDS...]}
shift
SEEDS=${*:-0 1 2}
SODA=${SODA:-.venv/bin/soda}
mkdir -p "$OUT"
printf '%-10s %4s %7s %7s %8s\n' attack seed acc asr train_s
for attack in stripet none; do
  for s in $SEEDS; do
    m="$OUT/${attack}_s$s"
    start=$(date +%s.%N)
    "$SODA" train --dataset fmnist --attack "$attack" --arch cnn --seed "$s" --out "$m.safetensors" \
        > "$m.train.log" 2>&1
    secs=$(echo "$(date +%s.%N) - $start" | bc)
    "$SODA" evaluate --model "$m.safetensors" --dataset fmnist --attack stripet --json "$m.eval.json" \
        > "$m.eval.log" 2>&1
    read -r acc asr < <(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['acc'], d['asr'])" "$m.eval.json")
    printf '%-10s %4s %7.4f %7.3f %8.0f\n' "$attack" "$s" "$acc" "$asr" "$secs"
  done
done
