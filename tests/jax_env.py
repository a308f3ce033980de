"""The XLA settings of the test processes: fast-compiling XLA:CPU flags, and the environment of a JAX subprocess.

Most of the suite's time is XLA compiling small programs that then run a few steps, so the tests trade the
compiled code's speed for compile time (BENCHMARKS.md section 7 measures it). These flags change how XLA:CPU
emits and optimises machine code, not the HLO program; ``tests/test_jax_env.py`` checks that the results agree
with XLA's defaults to rounding. Set ``IDMR_TEST_FULL_OPT=1`` to run the suite with XLA's default flags instead,
as users' runs compile.
Every JAX subprocess a test starts takes its flags from :func:`subprocess_env`, so that a killed-and-resumed or
multi-process run compiles exactly what the test process compiles.
"""

from __future__ import annotations

import os

# Measured on tests/test_precision.py (compile-bound, 18 tests, one process, a cold cache): 106 s with XLA's
# defaults, 77 s with the first two, 55 s with all four. Without the LLVM optimisation passes, the older
# per-op IR emitter (`fusion_emitters=false`) is far cheaper to compile than the MLIR fusion emitters.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def xla_flags_for_tests(flags: str | None, devices: int | None = None) -> str:
    """`flags` (an XLA_FLAGS value) with `devices` fake CPU devices (kept as given when None, else 8) and, unless
    ``IDMR_TEST_FULL_OPT=1``, the fast-compile flags that `flags` does not set itself."""
    kept = [f for f in (flags or "").split() if devices is None or _flag_name(f) != DEVICE_COUNT_FLAG]
    names = {_flag_name(f) for f in kept}
    if DEVICE_COUNT_FLAG not in names:
        kept.append(f"{DEVICE_COUNT_FLAG}={8 if devices is None else devices}")
    if os.environ.get("IDMR_TEST_FULL_OPT") != "1":
        kept += [f for f in FAST_COMPILE_FLAGS if _flag_name(f) not in names]
    return " ".join(kept)


def subprocess_env(devices: int, base: dict | None = None, **extra: str) -> dict:
    """The environment of a JAX subprocess on `devices` fake CPU devices: `base` (this process's environment by
    default) with the test run's XLA flags and compilation cache, ``JAX_PLATFORMS=cpu`` and `extra`."""
    env = dict(os.environ if base is None else base)
    env.update(XLA_FLAGS=xla_flags_for_tests(os.environ.get("XLA_FLAGS"), devices), JAX_PLATFORMS="cpu", **extra)
    return env
