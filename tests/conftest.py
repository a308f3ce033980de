"""Test setup: 8 fake CPU devices (a simulated TPU slice) and fast-compiling XLA:CPU flags (``jax_env.py``), set
before JAX is imported anywhere; one persistent XLA compilation cache shared by every process of the run; the
longest test files scheduled first.

Most of the suite's time is XLA compiling the same few programs (the tiny AdaFocal's init, train step and encoders)
in separate processes: the two pytest-xdist workers, ``python -m idmr_jax.main`` subprocesses, the notebook kernels.
The cache is set through JAX's environment variables, so every child process inherits it. It lives in a fresh
temporary folder per run (removed at the end), so a run never reads programs that another jaxlib, another XLA_FLAGS
or another CPU compiled; ``JAX_COMPILATION_CACHE_DIR`` set by the caller is used as it is instead (and kept).
A cached program is the same executable a fresh compile would give, so no number changes; an unreadable entry is
recompiled by JAX with a warning, it does not fail a test.
"""

import os
import shutil
import tempfile

from jax_env import xla_flags_for_tests

# 8 fake devices unless the caller's XLA_FLAGS say otherwise, and the fast-compiling XLA:CPU flags (jax_env.py).
os.environ["XLA_FLAGS"] = xla_flags_for_tests(os.environ.get("XLA_FLAGS"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Nothing may reach a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Set here, at import, so that the xdist workers (started after this) and every subprocess inherit it.
_OWN_CACHE_VAR = "IDMR_TEST_OWN_JAX_CACHE"  # the pid of the process that made the run's cache folder
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="idmr-test-jax-cache-")
    os.environ[_OWN_CACHE_VAR] = str(os.getpid())
# Every program, however small or quick to compile: the tiny models' programs compile in well under JAX's
# default threshold of 1 s each, and a checkpoint save alone compiles ~180 of them.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Test files by measured duration, longest first (the rest follow in their usual order). With
# `--dist loadfile --no-loadscope-reorder` (scripts/test.sh) the two workers take files in this order, so a long
# file starts at once instead of last, when the other worker would idle; see BENCHMARKS.md section 7.
LONGEST_FIRST = (
    "test_train.py", "test_notebooks.py", "test_analysis.py", "test_multihost.py", "test_backbones.py",
    "test_precision.py", "test_idmr_task.py", "test_export.py", "test_universal_train.py", "test_workdir_safety.py",
    "test_cir_eval.py", "test_rerank_loop.py", "test_instructcir_recipe.py", "test_convert.py", "test_demo.py",
    "test_llava.py", "test_jax_env.py", "test_oacir_pipeline.py", "test_bench.py", "test_qwen2vl.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


def pytest_unconfigure(config):
    if os.environ.get(_OWN_CACHE_VAR) == str(os.getpid()):  # only the process that made it (not xdist workers)
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
