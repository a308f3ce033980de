#!/usr/bin/env bash
# The main job on the embedded demo: sets up .venv if needed, then trains and evaluates AdaFocal.
# Usage: bash scripts/demo.sh [WORKDIR] [extra flags for idmr_jax.main, e.g. --config.train.num_steps=50]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
WORKDIR="${1:-$ROOT/workdir/demo}"
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m idmr_jax.main --config="${IDMR_DEMO_CONFIG:-configs/oacir.py:demo}" --workdir="$WORKDIR" "$@"
echo "results: $WORKDIR/eval/metrics.json"
