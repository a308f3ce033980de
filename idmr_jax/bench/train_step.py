"""``train_step``: examples/s and step time of one jitted AdaFocal update (forward, backward, optimiser), and the
same step in PyTorch side by side.

    python -m idmr_jax.bench train_step --compare=torch [--reps=10] [--out=F.json]   # cpu_mid, 4 comparisons
    python -m idmr_jax.bench train_step --compare=torch --only --dtype=float32 --vit-cache=both   # one of them
    python -m idmr_jax.bench train_step --config=demo --profile=DIR --only          # where the time goes
    python -m idmr_jax.bench train_step --config=vitg --dtype=bfloat16 --only      # on an accelerator

A *comparison* is one precision (``--dtype``: ``bfloat16`` = the "bf16" policy of :mod:`idmr_jax.precision`,
or ``float32``) and one ViT mode (``--vit-cache``): ``none`` runs the frozen ViT every step on both sides
(identical work), ``both`` reads its cached output on both sides (identical work: the recipe freezes the ViT and
does not augment, so this changes no number), ``jax`` caches on the JAX side only (PyTorch runs the ViT every
step, as the PyTorch implementations do). The default comparison is ``--dtype=bfloat16 --vit-cache=none``.

``--compare=torch`` switches the JAX side to the standard CIR baseline (no CAAM: what transformers can express)
and runs, in the same process on the same shapes, batch and weights, the PyTorch step of
:mod:`idmr_jax.bench.torch_baseline` at the same precision (bf16: ``torch.autocast`` with float32 parameters
and optimiser state), SDPA attention, fused AdamW and as many threads as XLA's CPU pool has. Without ``--only``
it runs four comparisons, float32 and bfloat16 each with ``--vit-cache=none`` and ``both`` (plus the default
one if it is another), one after another, each with its own build, compilation and warm-up. Within a
comparison the two sides alternate step by step, so a load change on a shared machine hits both. Each
comparison reports both sides' median step time and spread, examples/s, ``ratio = jax_examples_per_s /
torch_examples_per_s`` and ``parity``: both sides' loss on the same weights with dropout off, within
:func:`parity_tolerance`, which shows they compute the same function. Each side also reports its process CPU
time per step and ``cores_busy_median`` (CPU time over wall time), and the comparison ``cpu_work_ratio =
torch_cpu_s / jax_cpu_s``. Since ``ratio = cpu_work_ratio * jax_cores_busy / torch_cores_busy`` (rep by rep;
about so for the medians), where both sides keep every core busy a higher ratio needs less CPU work for the same
step, not better scheduling. The JSON's top level repeats the default comparison (``ratio``, ``jax``,
``torch``, ``parity``, ``model``); ``comparisons`` holds all of them by ``DTYPE/CACHE`` and ``ratios`` their
ratios.

With ``--compare=torch`` a comparison of identical work (``--vit-cache`` ``none`` or ``both``) also reports a
``roofline``: the step's model FLOPs (its matmuls, counted as :mod:`idmr_jax.bench.flops` counts them) against
the machine's matmul peak in the compute dtype, measured in the same reps (:mod:`idmr_jax.bench.mfu`). Both
sides do those matmuls, so their utilisations of the peak compare directly; ``ratio_ceiling`` is the ratio JAX
would reach if its step were nothing but those matmuls at the peak, and ``jax_utilisation_for_target`` the share
of the peak JAX's whole step would need for a ratio of ``TARGET_RATIO``.

JAX runs on one CPU device with ``--compare=torch`` (the machine's cores, as PyTorch's one process; fake
``--xla_force_host_platform_device_count`` devices would split the same cores), else on the config's mesh.
``--profile=DIR`` also traces the default comparison's step with ``jax.profiler`` (and ``torch.profiler`` with
``--compare=torch``) and summarises where the time goes (:mod:`idmr_jax.bench.step_profile`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from idmr_jax.bench import common, mfu

DTYPES = ("float32", "bfloat16")
# The ViT modes of the comparison matrix: identical work on both sides, uncached and cached.
MATRIX_CACHES = ("none", "both")
FLOAT32_PARITY_ABS = 1e-4  # float32: both sides' losses agree to float32 rounding over the step's reductions
TARGET_RATIO = 1.5  # the project's target for the default comparison (BENCHMARKS.md section 1)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu_mid", help="preset (tiny, cpu_mid, demo, vitg) or configs/oacir.py:ARGS")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "bf16", "float32"],
                   help="precision of the default comparison: bfloat16 (the bf16 policy) or float32")
    p.add_argument("--vit-cache", choices=["none", "both", "jax"], default="none",
                   help="ViT mode of the default comparison: none (ViT every step on both sides), both (cached "
                   "frozen-ViT features on both sides), jax (JAX caches, PyTorch runs the ViT every step)")
    p.add_argument("--only", action="store_true",
                   help="run only the default comparison (--dtype, --vit-cache), not the float32/bfloat16 x "
                   "none/both matrix that --compare=torch runs otherwise")
    p.add_argument("--devices", type=int, default=None,
                   help="use the first N devices (default: 1 with --compare=torch, else the config's mesh)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--compare", choices=["none", "torch"], default="none")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (default: the cores this process may use, XLA's pool size). "
                   "torch: set_num_threads; XLA's CPU thread pool cannot be sized, only switched to one thread "
                   "(1 -> --xla_cpu_multi_thread_eigen=false, set by `python -m idmr_jax.bench` before JAX starts)")
    p.add_argument("--steps-per-rep", type=int, default=1,
                   help="consecutive steps per timed rep (JAX syncs once per rep, as the trainer does)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-sizes", default=None,
                   help="square matmul sizes of the roofline's measured peak (default: mfu's, 1024,2048 on CPU)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace the default comparison's step into DIR and summarise where its time goes")


def before_jax(argv) -> None:
    """``--threads=1`` also makes XLA's CPU backend single-threaded (it has no other thread-count setting)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=None)
    known, _ = parser.parse_known_args(list(argv))
    if known.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def cpu_threads() -> int:
    """The cores this process may run on: the size of XLA's CPU thread pool, and PyTorch's thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parity_tolerance(dtype: str) -> dict:
    """How far apart the two sides' losses on the same weights may be: float32 ``{"abs": 1e-4}``; bfloat16 the
    precision policy's documented loss drift, ``{"rel": idmr_jax.precision.TOLERANCES["loss"]}`` (each side
    rounds its own bf16 activations, so they agree no better than either agrees with float32)."""
    from idmr_jax import precision

    if precision.policy_for_dtype(dtype) == "float32":
        return {"abs": FLOAT32_PARITY_ABS}
    return {"rel": precision.TOLERANCES["loss"]}


def within_tolerance(parity: dict, tolerance: dict) -> bool:
    """Whether a :func:`torch_baseline.parity` result is within `tolerance` (see :func:`parity_tolerance`)."""
    if "abs" in tolerance:
        return parity["abs_diff"] <= tolerance["abs"]
    return parity["abs_diff"] <= tolerance["rel"] * abs(parity["loss_jax"])


def comparisons(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (dtype, vit_cache) pairs to run, the default first."""
    default = (_dtype_name(args.dtype), args.vit_cache)
    if args.only or args.compare != "torch":
        return [default]
    return [default] + [(d, c) for d in DTYPES for c in MATRIX_CACHES if (d, c) != default]


def _dtype_name(dtype: str) -> str:
    return "bfloat16" if dtype in ("bf16", "bfloat16") else dtype


def key(dtype: str, vit_cache: str) -> str:
    """A comparison's name in the JSON, e.g. ``bfloat16/none``."""
    return f"{_dtype_name(dtype)}/{vit_cache}"


def run(args: argparse.Namespace) -> dict:
    import jax

    if args.compare == "torch" and jax.default_backend() != "cpu":
        raise SystemExit("--compare=torch runs the PyTorch CPU build side by side with JAX on CPU; "
                         f"this JAX runs on {jax.default_backend()}")
    runs = comparisons(args)
    result = {"suite": "train_step", "config": args.config, "machine": common.machine_info(),
              "default": key(*runs[0]), "comparisons": {}}
    for i, (dtype, vit_cache) in enumerate(runs):
        profile_dir = args.profile if i == 0 else None
        result["comparisons"][key(dtype, vit_cache)] = compare_one(args, dtype, vit_cache, profile_dir=profile_dir)
    default = result["comparisons"][result["default"]]
    for field in ("model", "build_s", "compile_s", "steps_per_rep", "jax", "torch", "parity", "ratio",
                  "paired_ratio_median", "cpu_work_ratio", "roofline", "profile"):
        if field in default:
            result[field] = default[field]
    if args.compare == "torch":
        result["ratios"] = {k: c["ratio"] for k, c in result["comparisons"].items()}
    return result


def _side(times, cpu_times, batch_size) -> dict:
    s = common.summarize(times)
    s["examples_per_s"] = batch_size / s["median_s"]
    s["cpu_s_median"] = statistics.median(cpu_times)
    # Cores kept busy: the process's CPU time over the wall time, rep by rep (2.0 = both cores of the 2-core
    # machine all the time). With both sides as busy, the wall ratio can only follow the CPU work ratio.
    s["cores_busy_median"] = statistics.median(c / t for c, t in zip(cpu_times, times))
    return s


def compare_one(args: argparse.Namespace, dtype: str, vit_cache: str, *, profile_dir: str | None = None) -> dict:
    """One comparison: the JAX step (and with ``--compare=torch`` the PyTorch step) at `dtype` and `vit_cache`,
    built, compiled, warmed up and timed in alternating reps; see the module docstring."""
    import jax

    from idmr_jax.bench import configs, jax_step

    compare = args.compare == "torch"
    devices = args.devices or (1 if compare else None)
    config = configs.load(args.config, dtype=dtype, batch_size=args.batch_size,
                          device_count=devices or jax.device_count())
    if compare:
        if config.model.vision.get("kind", "vit") != "vit":
            raise SystemExit(f"--compare=torch needs a ViT config (transformers' BLIP-2); {args.config} has a "
                             f"{config.model.vision.kind} encoder: run it without --compare")
        config.model.beta_mode = "none"  # the standard CIR baseline: what transformers' BLIP-2 can express
    result = {"dtype": _dtype_name(dtype), "vit_cache": vit_cache, "precision": config.precision}

    t0 = time.perf_counter()
    js = jax_step.build(config, devices=devices, vit_cache=vit_cache != "none")
    result["build_s"] = time.perf_counter() - t0
    result["model"] = {**jax_step.describe(config, js), "vit_cache": vit_cache, "precision": config.precision}
    bs = js.batch_size

    ts = tbatch = None
    if compare:
        import torch

        from idmr_jax.bench import torch_baseline

        threads = args.threads or cpu_threads()
        ts = torch_baseline.from_jax(js, threads=threads)
        host_batch = js.pixel_batch if vit_cache == "jax" else js.local_batch
        tbatch = ts.batch(host_batch)
        parity = torch_baseline.parity(js, ts, host_batch)
        tolerance = parity_tolerance(dtype)
        result["parity"] = {**parity, "tolerance": tolerance, "within_tolerance": within_tolerance(parity, tolerance)}
        result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                           "attn_implementation": ts.attn_implementation, "optimizer": ts.optimizer_impl,
                           "autocast": ts.compute_dtype if ts.autocast else None,
                           "trainable_params": ts.num_trainable()}

    peak_calls = model_flops = None
    peak_dtype = mfu.peak_dtype(config)
    if compare and vit_cache != "jax":  # identical work: one FLOP count for both sides
        model_flops = step_model_flops(config, bs, vit_cache)
        peak_calls = mfu.matmul_calls(mfu.peak_sizes(args.peak_sizes), peak_dtype)["xla"]

    t0 = time.perf_counter()
    js.compile()
    result["compile_s"] = time.perf_counter() - t0
    for _ in range(max(args.warmup, 1)):  # at least one: the first run of a program also initialises it
        js.sync(js.run())
        if ts is not None:
            ts.step(tbatch)
        for call in (peak_calls or {}).values():
            call()
    timing = time_alternating(js, ts, tbatch, reps=args.reps, steps_per_rep=args.steps_per_rep,
                              peak_calls=peak_calls)
    if ts is not None:
        timing["torch"] = {**result.pop("torch"), **timing["torch"]}
    if peak_calls:
        peak = mfu.peak_summary(timing.pop("peak_times"), peak_dtype)
        result["roofline"] = {**roofline(model_flops, peak["best_flops_per_s"], timing["jax"]["median_s"],
                                         timing["torch"]["median_s"]), "peak": peak}
    result.update(timing)
    if profile_dir:
        from idmr_jax.bench import step_profile

        result["profile"] = {"jax": step_profile.profile_jax(js, os.path.join(profile_dir, "jax"))}
        if ts is not None:
            result["profile"]["torch"] = step_profile.profile_torch(ts, tbatch, os.path.join(profile_dir, "torch"))
    return result


def step_model_flops(config, batch_size: int, vit_cache: str) -> float:
    """Model FLOPs of one step of the compared model (:func:`idmr_jax.bench.flops.train_step_flops`); with
    ``vit_cache="both"`` without the frozen ViT's forward, which neither side then runs."""
    from idmr_jax.bench import configs, flops

    parts = flops.train_step_flops(configs.model_config(config), batch_size, int(config.data.max_text_len),
                                   frozen_vision=bool(config.model.freeze_vision))
    return float(parts["total"] - (parts["vit_forward"] if vit_cache == "both" else 0))


def roofline(model_flops: float, peak_flops_per_s: float, jax_s: float, torch_s: float) -> dict:
    """The step's matmuls against the measured matmul peak (see the module docstring): each side's utilisation
    of the peak, ``ratio_ceiling = torch_s / (model_flops / peak)`` and the JAX utilisation that a ratio of
    ``TARGET_RATIO`` needs, ``TARGET_RATIO * torch_utilisation``. Above 1 it cannot be reached."""
    at_peak_s = model_flops / peak_flops_per_s
    return {"model_flops": model_flops, "peak_flops_per_s": peak_flops_per_s, "matmuls_at_peak_s": at_peak_s,
            "jax_utilisation": at_peak_s / jax_s, "torch_utilisation": at_peak_s / torch_s,
            "ratio_ceiling": torch_s / at_peak_s, "target_ratio": TARGET_RATIO,
            "jax_utilisation_for_target": TARGET_RATIO * at_peak_s / torch_s}


def time_alternating(js, ts, tbatch, *, reps: int, steps_per_rep: int, peak_calls: dict | None = None) -> dict:
    """Timed reps of `js` (a :class:`~idmr_jax.bench.jax_step.JaxStep`: ``run``, ``sync``, ``batch_size``) and,
    unless `ts` is None, of ``ts.step(tbatch)`` (the PyTorch step), JAX then PyTorch in each rep. Returns both
    sides' wall-time summaries, CPU time and cores kept busy, ``ratio``, ``paired_ratio_median`` and
    ``cpu_work_ratio`` (see the module docstring). `peak_calls` (``{n: call}``, :func:`mfu.matmul_calls`) are
    timed once each per rep after the steps, so the peak sees the same machine; their times come back as
    ``peak_times``."""
    # Wall time is the measure; CPU time tells whether a side used the cores or waited (and, on a shared machine,
    # whether the load took them).
    # A rep is `steps_per_rep` consecutive steps: JAX dispatches them back to back and waits once at the end, as
    # the trainer does (no host sync inside the loop), so each step's host-side dispatch overlaps the previous
    # step's computation; torch runs them one after another (each `step` reads its loss).
    w = max(steps_per_rep, 1)
    jax_times, torch_times, jax_cpu, torch_cpu, torch_loss, metrics = [], [], [], [], None, None
    peak_times: dict[int, list[float]] = {}
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(w):
            metrics = js.run()
        js.sync(metrics)
        jax_times.append((time.perf_counter() - t0) / w)
        jax_cpu.append((time.process_time() - c0) / w)
        if ts is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(w):
                torch_loss = ts.step(tbatch)
            torch_times.append((time.perf_counter() - t0) / w)
            torch_cpu.append((time.process_time() - c0) / w)
        for n, call in (peak_calls or {}).items():
            peak_times.setdefault(n, []).extend(common.time_calls(call, warmup=0, reps=1))
    bs = js.batch_size
    out = {"steps_per_rep": w, "jax": {**_side(jax_times, jax_cpu, bs), "last_loss": float(metrics["loss"])}}
    if ts is not None:
        out["torch"] = {**_side(torch_times, torch_cpu, bs), "last_loss": torch_loss}
        out["ratio"] = out["jax"]["examples_per_s"] / out["torch"]["examples_per_s"]
        out["paired_ratio_median"] = statistics.median(t / j for j, t in zip(jax_times, torch_times))
        out["cpu_work_ratio"] = out["torch"]["cpu_s_median"] / out["jax"]["cpu_s_median"]
    if peak_calls:
        out["peak_times"] = peak_times
    return out
