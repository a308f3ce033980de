#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest on 8 fake CPU devices (a simulated TPU slice),
# in two worker processes.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k vit`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/setup.sh
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}" JAX_PLATFORMS=cpu
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
# Two pytest workers (pytest-xdist), whole files per worker so module fixtures are built once: most tests wait on
# single-threaded XLA compilation, so two of them share the 2 cores of a small CI machine well. Files go out in
# the order tests/conftest.py gives them (longest first), not xdist's (most tests first), so that no long file
# starts last; all processes of the run share one XLA compilation cache (tests/conftest.py).
# IDMR_TEST_WORKERS=0 runs everything in this process.
python -m pytest -q -ra --durations=25 -n "${IDMR_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected. With a selection (-k, -m, paths) that only means nothing
# matched; for the full suite (as CI runs it) it means the suite is broken, so it stays a failure.
if [[ $rc -eq 5 ]]; then
  if [[ $# -gt 0 ]]; then
    echo "warning: no tests matched the selection: $*" >&2
    exit 0
  fi
  echo "error: pytest collected no tests" >&2
fi
exit $rc
