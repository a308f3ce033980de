#!/usr/bin/env bash
# The README's demo table: `scripts/demo.sh` for AdaFocal and the standard CIR baseline, 3 seeds each, in sequence,
# then the table (mean ± standard deviation over the seeds) printed in Markdown.
# Usage: bash scripts/demo_seeds.sh [RUNS_DIR] [SEEDS]      (defaults: workdir/demo_seeds, "0 1 2")
# A seed is the model's initialisation and dropout (config.seed) and the training order (data.shuffle_seed); the
# benchmark stays the same (data.demo_seed=0). A run whose eval/metrics.json exists is not run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${1:-$ROOT/workdir/demo_seeds}"
SEEDS="${2:-0 1 2}"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"  # the table at the end runs in this shell's .venv
mkdir -p "$RUNS"
for model in adafocal baseline; do
  config="configs/oacir.py:demo"
  [[ "$model" == baseline ]] && config="configs/oacir.py:demo,baseline"
  for seed in $SEEDS; do
    wd="$RUNS/$model-seed$seed"
    [[ -f "$wd/eval/metrics.json" ]] && continue
    start=$(date +%s)
    IDMR_DEMO_CONFIG="$config" bash "$ROOT/scripts/demo.sh" "$wd" --config.seed="$seed" \
      --config.data.shuffle_seed="$seed" --config.train.progress=False
    echo $(( $(date +%s) - start )) > "$wd/wall_s"
  done
done
cd "$ROOT"
python -m idmr_jax.tasks.oacir.demo_table "$RUNS"
