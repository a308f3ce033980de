"""``mfu``: model FLOPs utilisation of the train step against the machine's measured matmul peak.

    python -m idmr_jax.bench mfu --config=cpu_mid [--reps=10] [--out=F.json]
    python -m idmr_jax.bench mfu --config=vitg --dtype=bfloat16                  # on an accelerator

* model FLOPs per step: counted analytically from the config (:mod:`idmr_jax.bench.flops`, matmuls only) and
  cross-checked against XLA's cost analysis of the compiled step (which also counts elementwise work);
* attainable peak: the best median FLOP/s of a large square jitted matmul at the model's compute dtype, measured
  in the same run (several sizes; the largest that fits the time budget wins on most machines);
* on CPU in float32 the same matmuls through NumPy's BLAS as a second measured peak
  (``utilisation_vs_best_peak`` uses the higher of the two); step and peak reps alternate, so both see the same
  machine state;
* ``utilisation = (model FLOPs / median step time) / measured peak``; on an accelerator also against the
  vendor's dense bf16 peak (``vendor_peak_flops``), the number MaxText-style MFU tables use.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from idmr_jax.bench import common

# Dense bf16 peak FLOP/s per chip (vendor data sheets), matched on jax's device_kind.
VENDOR_PEAK_BF16 = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
    ("L4", 121e12), ("A10", 125e12),
)


def vendor_peak(device_kind: str) -> float | None:
    """The vendor's dense bf16 peak FLOP/s for a jax ``device_kind`` string, or None if unknown."""
    for key, value in VENDOR_PEAK_BF16:
        if key.lower() in device_kind.lower():
            return value
    return None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu_mid", help="preset (tiny, cpu_mid, vitg) or configs/oacir.py:ARGS")
    p.add_argument("--dtype", default=None,
                   help="precision policy: bfloat16 (bf16) or float32 (default: the config's config.precision)")
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: the config's mesh)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--baseline", action="store_true", help="the standard CIR baseline (no CAAM)")
    p.add_argument("--peak-sizes", default=None,
                   help="matmul sizes for the peak (default: 1024,2048 on CPU, 4096,8192 on accelerators)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)


def peak_sizes(flag: str | None) -> list[int]:
    """The square matmul sizes of the measured peak: `flag` (``"1024,2048"``) if given, else 1024 and 2048 on
    CPU, 4096 and 8192 on accelerators."""
    import jax

    if flag:
        return common.parse_ints(flag)
    return [1024, 2048] if jax.default_backend() == "cpu" else [4096, 8192]


def peak_dtype(config) -> str:
    """The dtype the peak is measured in: the compute dtype of the trained part's matmuls (the Q-Former's)."""
    from idmr_jax import precision

    return precision.dtype_name(precision.compute_dtype(config, "qformer"))


def matmul_calls(sizes, dtype: str) -> dict[str, dict[int, Callable[[], Any]]]:
    """Zero-argument calls of an ``n x n @ n x n`` product per size: ``{"xla": {n: call}}`` (jitted, synced), and
    on CPU in float32 also ``{"numpy_blas": {n: call}}`` (NumPy's BLAS: a different library, a second opinion
    on the CPU's peak)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    calls: dict[str, dict[int, Callable[[], Any]]] = {"xla": {}}
    # Products accumulated in float32, as the model's bf16 matmuls are: on CPU a bf16 x bf16 -> bf16 dot is
    # rewritten by XLA into a float32 dot (no AMX), so it would measure the float32 peak under a bf16 name.
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        calls["xla"][n] = lambda a=a, b=b: jax.block_until_ready(mm(a, b))
    if jax.default_backend() == "cpu" and dtype == "float32":
        calls["numpy_blas"] = {}
        for n in sizes:
            rng = np.random.default_rng(n)
            a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
            calls["numpy_blas"][n] = lambda a=a, b=b: a @ b
    return calls


def peak_summary(times: dict[int, list[float]], dtype: str) -> dict:
    """Per size, the median FLOP/s of the timed ``n x n @ n x n`` products in `times` (``{n: [seconds]}``), and
    ``best_flops_per_s``: the highest of them, the attainable matmul peak."""
    rows = []
    for n, ts in times.items():
        s = common.summarize(ts)
        rows.append({"n": n, "flops_per_s": 2 * n ** 3 / s["median_s"], **s})
    return {"dtype": dtype, "sizes": rows, "best_flops_per_s": max(r["flops_per_s"] for r in rows)}


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def run(args: argparse.Namespace) -> dict:
    import jax

    from idmr_jax.bench import configs, flops, jax_step

    config = configs.load(args.config, dtype=args.dtype, batch_size=args.batch_size,
                          device_count=args.devices or jax.device_count())
    if args.baseline:
        config.model.beta_mode = "none"
    result = {"suite": "mfu", "config": args.config, "machine": common.machine_info()}
    js = jax_step.build(config, devices=args.devices)
    result["model"] = jax_step.describe(config, js)
    mc = configs.model_config(config)
    analytic = flops.train_step_flops(mc, js.batch_size, int(config.data.max_text_len),
                                      frozen_vision=bool(config.model.freeze_vision))
    # The compiled program is the per-device (SPMD-partitioned) one: its count is per device.
    t0 = time.perf_counter()
    xla = _xla_flops(js.compile())
    result["compile_s"] = time.perf_counter() - t0
    result["flops"] = {"analytic": analytic, "xla_cost_analysis_per_device": xla,
                       "xla_over_analytic": xla * js.mesh.size / analytic["total"] if xla else None}

    cpu = jax.default_backend() == "cpu"
    sizes = peak_sizes(args.peak_sizes)
    dtype = peak_dtype(config)
    calls = matmul_calls(sizes, dtype)
    # Step and peak reps alternate, so both see the same machine (a shared or throttled host drifts over minutes).
    step_times, peak_times = [], {lib: {n: [] for n in sizes} for lib in calls}
    for _ in range(args.warmup):
        js.sync(js.run())
        for lib in calls.values():
            for f in lib.values():
                f()
    for _ in range(args.reps):
        step_times += common.time_calls(js.run, warmup=0, reps=1, sync=js.sync)
        for name, lib in calls.items():
            for n, f in lib.items():
                peak_times[name][n] += common.time_calls(f, warmup=0, reps=1)
    step = common.summarize(step_times)
    step["examples_per_s"] = js.batch_size / step["median_s"]
    result["step"] = step

    peak = peak_summary(peak_times["xla"], dtype)
    result["peak"] = peak
    achieved = analytic["total"] / step["median_s"] / js.mesh.size  # per device, as the peak
    result["achieved_flops_per_s_per_device"] = achieved
    result["utilisation"] = achieved / peak["best_flops_per_s"]
    if "numpy_blas" in peak_times:
        result["peak_numpy_blas"] = peak_summary(peak_times["numpy_blas"], "float32")
        best = max(peak["best_flops_per_s"], result["peak_numpy_blas"]["best_flops_per_s"])
        result["utilisation_vs_best_peak"] = achieved / best
    if xla:
        result["utilisation_xla_flops"] = xla / step["median_s"] / peak["best_flops_per_s"]
    vp = None if cpu else vendor_peak(jax.devices()[0].device_kind)
    result["vendor_peak_flops"] = vp
    result["utilisation_vs_vendor_peak"] = achieved / vp if vp else None
    return result
