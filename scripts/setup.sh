#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs idmr_jax with its pinned dependencies; a no-op when up to date.
# Sourced by scripts/demo.sh and scripts/test.sh so that each works on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IDMR_VENV:-$ROOT/.venv}"
EXTRAS="${IDMR_EXTRAS:-dev,demo}"

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(command -v python3.11 || command -v python3)"
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"idmr_jax needs Python 3.11, found {sys.version}"'
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

stamp="$VENV/.idmr_installed"
want="$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)-$EXTRAS"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  # torch first and pinned: anything that merely depends on torch must not pull a multi-GB CUDA build.
  # (Installed with pip, not uv: the pinned CPU build is found through pip's configuration.)
  python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  python -m pip install --quiet --disable-pip-version-check -e "${ROOT}[$EXTRAS]"
  echo "$want" > "$stamp"
fi
