"""``train_step``: examples/s and step time of one jitted AdaFocal update (forward, backward, optimiser).

    python -m idmr_jax.bench train_step --config=cpu_mid [--compare=torch] [--reps=10] [--warmup=2] [--out=F.json]
    python -m idmr_jax.bench train_step --config=vitg --dtype=bfloat16          # on an accelerator

``--compare=torch`` switches the JAX side to the standard CIR baseline (no CAAM: what transformers can express)
and runs, in the same process on the same shapes, batch and weights, the PyTorch step of
:mod:`idmr_jax.bench.torch_baseline` (CPU, float32, the same thread count). The two sides alternate step by step
after their warm-ups, so a load change on a shared machine hits both. Reports each side's median step time and
spread, examples/s and ``ratio = jax_examples_per_s / torch_examples_per_s``, plus the loss of both sides on the
same weights with dropout off (``parity``), which shows they compute the same function.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from idmr_jax.bench import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="cpu_mid", help="preset (tiny, cpu_mid, demo, vitg) or configs/oacir.py:ARGS")
    p.add_argument("--dtype", default=None, help="compute dtype of the ViT and the Q-Former, e.g. bfloat16")
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: the config's mesh)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--compare", choices=["none", "torch"], default="none")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides (default: all cores). torch: set_num_threads; XLA's CPU thread "
                   "pool cannot be sized, only switched to one thread (1 -> --xla_cpu_multi_thread_eigen=false, set "
                   "by `python -m idmr_jax.bench` before JAX starts)")
    p.add_argument("--steps-per-rep", type=int, default=1,
                   help="consecutive steps per timed rep (JAX syncs once per rep, as the trainer does)")
    p.add_argument("--vit-cache", choices=["none", "both", "jax"], default="none",
                   help="which side reads cached frozen-ViT features instead of running the ViT every step (the "
                   "recipe freezes the ViT and does not augment, so this changes no number): none, both (same "
                   "work on both sides), jax (JAX caches, torch runs the ViT every step as the PyTorch "
                   "implementations do)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)


def before_jax(argv) -> None:
    """``--threads=1`` also makes XLA's CPU backend single-threaded (it has no other thread-count setting)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=None)
    known, _ = parser.parse_known_args(list(argv))
    if known.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()


def _side(times, batch_size) -> dict:
    s = common.summarize(times)
    s["examples_per_s"] = batch_size / s["median_s"]
    return s


def run(args: argparse.Namespace) -> dict:
    import jax

    from idmr_jax.bench import configs, jax_step

    config = configs.load(args.config, dtype=args.dtype, batch_size=args.batch_size,
                          device_count=args.devices or jax.device_count())
    compare = args.compare == "torch"
    if compare:
        if jax.default_backend() != "cpu":
            raise SystemExit("--compare=torch runs the PyTorch CPU build side by side with JAX on CPU; "
                             f"this JAX runs on {jax.default_backend()}")
        config.model.beta_mode = "none"  # the standard CIR baseline: what transformers' BLIP-2 can express
    result = {"suite": "train_step", "config": args.config, "machine": common.machine_info()}

    t0 = time.perf_counter()
    js = jax_step.build(config, devices=args.devices, vit_cache=args.vit_cache != "none")
    result["build_s"] = time.perf_counter() - t0
    result["model"] = jax_step.describe(config, js)
    result["model"]["vit_cache"] = args.vit_cache
    bs = js.batch_size

    ts = None
    if compare:
        import torch

        from idmr_jax.bench import torch_baseline

        threads = args.threads or os.cpu_count()
        ts = torch_baseline.from_jax(js, threads=threads)
        host_batch = js.pixel_batch if args.vit_cache == "jax" else js.local_batch
        tbatch = ts.batch(host_batch)
        result["parity"] = torch_baseline.parity(js, ts, host_batch)
        result["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                           "attn_implementation": ts.attn_implementation, "optimizer": ts.optimizer_impl,
                           "trainable_params": ts.num_trainable()}

    t0 = time.perf_counter()
    js.compile()
    result["compile_s"] = time.perf_counter() - t0
    for _ in range(max(args.warmup, 1)):  # at least one: the first run of a program also initialises it
        js.sync(js.run())
        if ts is not None:
            ts.step(tbatch)

    # Wall time is the measure; the process's CPU time per step is kept as a diagnostic for shared machines.
    # A rep is `steps_per_rep` consecutive steps: JAX dispatches them back to back and waits once at the end, as
    # the trainer does (no host sync inside the loop), so each step's host-side dispatch overlaps the previous
    # step's computation; torch runs them one after another (each `step` reads its loss).
    w = max(args.steps_per_rep, 1)
    jax_times, torch_times, jax_cpu, torch_cpu, torch_loss = [], [], [], [], None
    for _ in range(args.reps):
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
    jax_loss = float(metrics["loss"])

    result["steps_per_rep"] = w
    result["jax"] = {**_side(jax_times, bs), "cpu_s_median": statistics.median(jax_cpu), "last_loss": jax_loss}
    if ts is not None:
        result["torch"].update(_side(torch_times, bs), cpu_s_median=statistics.median(torch_cpu),
                               last_loss=torch_loss)
        result["ratio"] = result["jax"]["examples_per_s"] / result["torch"]["examples_per_s"]
        result["paired_ratio_median"] = statistics.median(t / j for j, t in zip(jax_times, torch_times))
    return result
