"""``real_size``: the project's full-size models, compiled and run on fake data over a (fake) 8-device mesh.

    python -m idmr_jax.bench real_size [--out=F.json]                      # EVA ViT-g/14 + Q-Former + CAAM
    python -m idmr_jax.bench real_size --task=idmr --lm=qwen2-7b [--out=F.json]   # CLIP ViT-L/14-336 + LM + LoRA
        [--config=PATH[:ARGS]] [--mesh=2,4,1] [--batch-size=8] [--steps=2] [--eval-examples=8] [--max-len=N]
        [--precision=bf16] [--set=FIELD=VALUE ...] [--compile-only | --force]

What only real shapes show (dims the mesh does not divide, scan and remat over 39 blocks, memory) shows here: the
config is ``configs/<task>.py`` with no keyword (the paper's model) on synthetic batches (``data.source=fake``),
the mesh ``data=2, fsdp=4`` (``--mesh``; the process gets exactly that many fake CPU devices) and a global batch
of 8, through the trainer's own code paths: ``train.setup.setup_state`` (the state initialised directly in its
sharded layout and storage dtype), the jitted, donated step of ``train.state.make_train_step`` with the task's
loss, and the task's evaluation.

Order: (1) the step is compiled against the *abstract* sharded state (``setup_state(abstract=True)``: nothing of
the model's size allocated), which gives the sharding report and XLA's memory plan; (2) only if that plan fits in
the memory available (``fits``; ``--force`` overrides, ``--compile-only`` stops here) the state is initialised
and the step runs ``--steps`` times, then the evaluation on a pool of ``--eval-examples``.

Reported: compile, init and step times, the evaluation's time (its programs' compilation included), the peak
resident memory of each phase (RSS high-water mark), XLA's per-device memory plan of the step
(``step_memory``; ``all_devices_bytes``: what all the fake devices hold at once, i.e. this process), and per state
part (trainable params, frozen params, optimiser state) total and per-device bytes, with every tensor the rules
leave whole on every device (``replicated_large``) or could not split because the mesh does not divide it
(``undivided``).

IDMR's LM sizes: ``--lm`` names a public Qwen2 architecture (:data:`LM_SIZES`, from its config.json), weights
random. Its prompt length is the image tokens (576 at 336 px) plus 16 text tokens unless ``--max-len`` says
otherwise (the recipe pads to 1024; the shorter length keeps a step within minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence

from idmr_jax.bench import common

# Public architecture numbers (each model's config.json on the Hugging Face hub) in configs/idmr.py's field names.
_QWEN2 = dict(family="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
LM_SIZES: dict[str, dict] = {
    "qwen2-0.5b": dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                       num_heads=14, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2-1.5b": dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                       num_heads=12, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(_QWEN2, vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                       num_heads=16, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2-7b": dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, tie_word_embeddings=False),  # configs/idmr.py's default size
}
# Tensors at least this large that sit whole on every device are listed (a big replicated tensor is a bug).
LARGE_BYTES = 4 << 20
# IDMR prompts: text tokens after the image tokens when --max-len is not given (caption, specials, padding).
_TEXT_TOKENS = 16


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["oacir", "idmr"], default="oacir")
    p.add_argument("--config", default=None, help="config file[:ARGS] (default: configs/<task>.py, no keyword)")
    p.add_argument("--lm", choices=sorted(LM_SIZES), default="qwen2-0.5b",
                   help="IDMR's decoder LM architecture (random weights); ignored with --config")
    p.add_argument("--mesh", default="2,4,1", help="data,fsdp,model sizes (their product: the fake CPU devices)")
    p.add_argument("--batch-size", type=int, default=8, help="global train and eval batch")
    p.add_argument("--steps", type=int, default=2, help="train steps after compilation")
    p.add_argument("--eval-examples", type=int, default=8, help="size of the fake evaluation pool")
    p.add_argument("--max-len", type=int, default=None, help="IDMR prompt length (default: image tokens + 16)")
    p.add_argument("--precision", default=None, help="config.precision (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any config override, e.g. --set=model.vision.remat=full (Python literal or string)")
    p.add_argument("--large-mib", type=float, default=LARGE_BYTES / 2**20,
                   help="list replicated tensors at least this large")
    p.add_argument("--force", action="store_true",
                   help="run even when the step's memory plan exceeds the memory available (see `fits`)")
    p.add_argument("--compile-only", action="store_true",
                   help="allocate nothing: compile the step against the abstract sharded state and report XLA's "
                   "per-device memory plan and the host memory it predicts (sizes too large to run here)")


# XLA:CPU passes that make every fake device hold full-size copies a TPU would not (BENCHMARKS.md section 6):
# loop-invariant code motion hoists the float32 conversion of scanned, stacked weights out of the layer loop; the
# all-reduce combiner batches every full-size weight gradient into one buffer (XLA:CPU all-reduces, then slices);
# the concurrency-optimised scheduler issues the weight all-gathers up front, each copy alive until its use. With
# them the paper's OACIR step plans 34.7 GiB over 8 fake devices, without them 11.9 GiB. TPU/GPU ignore them.
CPU_SIMULATION_FLAGS = ("--xla_disable_hlo_passes=while-loop-invariant-code-motion,cpu-all-reduce-combiner",
                        "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def before_jax(argv: Sequence[str]) -> None:
    """Asks for exactly as many fake CPU devices as ``--mesh`` covers, replacing any count already in XLA_FLAGS,
    and adds :data:`CPU_SIMULATION_FLAGS` unless XLA_FLAGS already sets those options (before JAX initialises)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mesh", default="2,4,1")
    known, _ = parser.parse_known_args(list(argv))
    need = math.prod(common.parse_ints(known.mesh))
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    for flag in CPU_SIMULATION_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()


# ----------------------------------------------------------------------------------------------
# The config.


def _literal(text: str):
    """A ``--set`` value: a Python literal where it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def real_size_config(args: argparse.Namespace):
    """The task's full-size config on fake data, the bench's mesh, batch and step count (see module docstring)."""
    from pathlib import Path

    from idmr_jax import tasks
    from idmr_jax.bench import configs

    spec = args.config or str(Path(configs.__file__).resolve().parents[2] / "configs" / f"{args.task}.py")
    config = configs.from_file(spec)
    data, fsdp, model = common.parse_ints(args.mesh)
    config.sharding.mesh = dict(data=data, fsdp=fsdp, model=model)
    config.mode, config.data.source = "train", "fake"
    config.data.batch_size = config.eval.batch_size = args.batch_size
    config.train.num_steps, config.train.progress = args.steps, False
    if args.precision is not None:
        config.precision = args.precision
    if config.task == "idmr":
        if args.config is None:
            config.model.text.update(LM_SIZES[args.lm])
            config.model.init.format, config.model.init.path = "", ""  # random weights: no checkpoint to read
        # The fake pool: instances x 2 scenes each; evaluation queries every example against every image.
        config.data.fake_instances = max(args.eval_examples // 2, 1)
        config.data.fake_scenes, config.data.fake_scenes_per_instance = max(args.eval_examples // 2, 2), 2
        image_tokens = tasks.build(config).image_tokens  # cheap: the task builds nothing until asked
        config.data.max_len = args.max_len or image_tokens + _TEXT_TOKENS
        config.data.candidate_max_len = 0
        rows_per_device = args.batch_size // (data * fsdp)
        if config.loss.gradcache_chunk and rows_per_device % config.loss.gradcache_chunk:
            config.loss.gradcache_chunk = max(rows_per_device, 1)  # still GradCache, in one chunk
    else:
        config.data.fake_pool = max(args.eval_examples, args.batch_size)
    for item in args.set:
        field, _, value = item.partition("=")
        configs.set_field(config, field.strip(), _literal(value.strip()), must_exist=True)
    return config


# ----------------------------------------------------------------------------------------------
# Where the state's bytes are.


def sharding_report(state, mesh, rules, *, large_bytes: int = LARGE_BYTES) -> dict:
    """Total and per-device bytes of the train state's parts, and the tensors the rules fail to split.

    Per part (``params``, ``frozen``, ``opt_state``): tensor count, total bytes, bytes on one device (every device
    holds one shard of every tensor) and total bytes by dtype. ``fsdp_sharded``: the tensors split over the
    ``fsdp`` axis (their per-device bytes are their total over the axis size). ``replicated_large``: tensors of at
    least `large_bytes` held whole on every device; ``undivided``: tensors whose logical rules name a mesh axis
    (of size > 1) that their shape does not divide, so they stay whole along it.
    """
    import jax
    from flax import nnx

    from idmr_jax import sharding as shd

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    parts, fsdp = {}, {"bytes": 0, "per_device_bytes": 0, "count": 0}
    replicated, undivided = [], []
    for part in ("params", "frozen", "opt_state"):
        row = {"count": 0, "bytes": 0, "per_device_bytes": 0, "by_dtype": {}}
        for path, leaf in jax.tree_util.tree_flatten_with_path(getattr(state, part), is_leaf=is_var)[0]:
            value = leaf.get_value() if is_var(leaf) else leaf
            if not isinstance(value, jax.Array | jax.ShapeDtypeStruct):
                continue
            names = leaf.get_metadata().get("out_sharding") if is_var(leaf) else None
            total = math.prod(value.shape) * value.dtype.itemsize
            local = math.prod(value.sharding.shard_shape(value.shape)) * value.dtype.itemsize
            row["count"] += 1
            row["bytes"] += total
            row["per_device_bytes"] += local
            row["by_dtype"][str(value.dtype)] = row["by_dtype"].get(str(value.dtype), 0) + total
            actual = set(shd.pspec_axes(getattr(value.sharding, "spec", None) or ()))  # a single-device array: none
            name = "/".join([part, jax.tree_util.keystr(path, simple=True, separator="/")])
            about = {"path": name, "shape": list(value.shape), "dtype": str(value.dtype), "bytes": total,
                     "logical": list(names) if names else None}
            if "fsdp" in actual:
                fsdp["count"] += 1
                fsdp["bytes"] += total
                fsdp["per_device_bytes"] += local
            wanted = {a for a in shd.pspec_axes(shd.logical_to_pspec(names, rules)) if mesh.shape[a] > 1}
            if wanted - actual:
                undivided.append({**about, "axes_dropped": sorted(wanted - actual)})
            if local == total and total >= large_bytes and mesh.size > 1:
                replicated.append(about)
        parts[part] = row
    replicated.sort(key=lambda r: -r["bytes"])
    undivided.sort(key=lambda r: -r["bytes"])
    return {"parts": parts,
            "bytes": sum(p["bytes"] for p in parts.values()),
            "per_device_bytes": sum(p["per_device_bytes"] for p in parts.values()),
            "fsdp_size": int(mesh.shape.get("fsdp", 1)), "fsdp_sharded": fsdp,
            "large_bytes": large_bytes, "replicated_large": replicated,
            "replicated_large_bytes": sum(r["bytes"] for r in replicated),
            "undivided": undivided, "undivided_bytes": sum(r["bytes"] for r in undivided)}


# ----------------------------------------------------------------------------------------------
# The run.


class _Phase:
    """Wall time and peak RSS of a block (the high-water mark is reset at its start, where Linux allows)."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self):
        common.reset_host_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.record[f"{self.name}_s"] = time.perf_counter() - self.t0
        self.record.setdefault("peak_rss_bytes", {})[self.name] = common.host_memory().get("peak_rss_bytes")
        return False


def _memory_analysis(compiled, devices: int) -> dict:
    """XLA's memory plan of the compiled step, per device, and ``all_devices_bytes``: what all the mesh's devices
    hold at the step's peak (arguments, outputs not aliased to a donated argument, temporaries), which on fake CPU
    devices all live in this process's memory."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}
    if len(out) == len(fields):
        per_device = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                      + out["temp_size_in_bytes"])
        out["all_devices_bytes"] = devices * per_device
    return out


def describe(config, task) -> dict:
    """The sizes the run refers to: the config's model fields, precision, mesh and batch."""
    model = config.model.to_dict()
    keep = {k: model[k] for k in ("vision", "qformer", "text", "num_query_tokens", "embed_dim", "lora",
                                  "freeze_vision") if k in model}
    out = {"task": config.task, "precision": config.get("precision"), "batch_size": int(config.data.batch_size),
           "mesh": dict(config.sharding.mesh), "model": keep}
    if config.task == "idmr":
        out["max_len"], out["image_tokens"] = int(config.data.max_len), int(task.image_tokens)
    return out


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from idmr_jax import sharding as shd
    from idmr_jax import tasks
    from idmr_jax.config_checks import check_config
    from idmr_jax.train.setup import setup_state
    from idmr_jax.train.state import batch_shardings, make_train_step
    from idmr_jax.train.trainer import global_batch, model_inputs

    config = real_size_config(args)
    check_config(config)  # as `idmr_jax.main` does: a batch or mesh these devices cannot run fails here
    task = tasks.build(config)
    result = {"suite": "real_size", "config": args.config or f"configs/{args.task}.py",
              "lm": args.lm if config.task == "idmr" and args.config is None else None,
              "compile_only": bool(args.compile_only), "machine": common.machine_info(),
              "setup": describe(config, task), "timings": {}}
    timings = result["timings"]
    mesh = shd.mesh_from_config(config)
    steps = max(args.steps, 1)

    # 1. The step, compiled against the abstract sharded state: nothing of the model's size is allocated yet.
    abstract = setup_state(task, total_steps=steps, mesh=mesh, abstract=True)
    rules = abstract.rules
    result["state"] = sharding_report(abstract.state, mesh, rules, large_bytes=int(args.large_mib * 2**20))
    with shd.axis_rules(mesh, rules):
        data_iter = task.train_iterator()
        local = model_inputs(next(data_iter))
        batch_sh = batch_shardings(mesh, rules, local)
        step_fn = make_train_step(abstract.graphdef, task.bind_mesh(mesh), abstract.optimizer, abstract.schedules,
                                  abstract.state_shardings, batch_sh)
        batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in local.items()}
        with _Phase(timings, "compile"):
            compiled = step_fn.lower(abstract.state, batch_shapes).compile()
    result["step_memory"] = plan = _memory_analysis(compiled, mesh.size)
    result["fits"] = fits = _fit_check(plan)
    if args.compile_only or not (fits["fits"] or args.force):
        result["ran"] = False
        if not args.compile_only:
            print(f"real_size: not running: {fits['reason']} (--force runs anyway)")
        return _finish(result, data_iter)

    # 2. The run: the trainer's sharded init, the compiled step on the task's batches, the task's evaluation.
    result["ran"] = True
    with _Phase(timings, "init"):
        setup = setup_state(task, total_steps=steps, mesh=mesh)
        jax.block_until_ready(setup.state)
    state = setup.state
    with shd.axis_rules(mesh, rules):
        losses, step_times = [], []
        with _Phase(timings, "train"):
            for i in range(args.steps):
                batch = global_batch(local if i == 0 else model_inputs(next(data_iter)), batch_sh)
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                losses.append(float(metrics["loss"]))  # the wait for the step's end
                step_times.append(time.perf_counter() - t0)
        timings["step_s"] = step_times
        result["losses"] = losses
        result["loss_finite"] = bool(losses) and all(np.isfinite(losses))
        model = nnx.merge(setup.graphdef, state.params, state.frozen)
        with tempfile.TemporaryDirectory(prefix="idmr_real_size_") as workdir, _Phase(timings, "eval"):
            result["eval"] = task.evaluate(model, workdir, args.steps)
    return _finish(result, data_iter)


def _fit_check(plan: dict) -> dict:
    """Whether the step's planned memory (all devices) fits in this machine's available memory, with 10% and
    1 GiB to spare; true where the plan or the figure is unknown."""
    available = common.meminfo_bytes("MemAvailable")
    need = plan.get("all_devices_bytes")
    if available is None or need is None:
        return {"fits": True, "reason": "memory plan or MemAvailable unknown"}
    fits = need * 1.1 + 2**30 <= available
    reason = (f"the step's memory plan over all devices, {need / 2**30:.1f} GiB (+10% + 1 GiB), "
              f"{'fits in' if fits else 'exceeds'} the {available / 2**30:.1f} GiB available")
    return {"fits": fits, "need_bytes": need, "available_bytes": available, "reason": reason}


def _finish(result: dict, data_iter) -> dict:
    if hasattr(data_iter, "close"):
        data_iter.close()
    peaks = [v for v in result["timings"].get("peak_rss_bytes", {}).values() if v]
    result["peak_rss_bytes"] = max(peaks) if peaks else None
    result["summary"] = _summary(result)
    return result


def _summary(r: dict) -> dict:
    """The headline figures in GiB and seconds (what BENCHMARKS.md quotes)."""
    gib = lambda b: None if b is None else round(b / 2**30, 2)  # noqa: E731
    t, s = r["timings"], r["state"]
    out = {"ran": r["ran"], "compile_s": round(t["compile_s"], 1),
           "peak_rss_gib": gib(r["peak_rss_bytes"]),
           "step_plan_all_devices_gib": gib(r["step_memory"].get("all_devices_bytes")),
           "per_device_state_gib": gib(s["per_device_bytes"]),
           "per_device_params_gib": gib(s["parts"]["params"]["per_device_bytes"]
                                        + s["parts"]["frozen"]["per_device_bytes"]),
           "per_device_opt_state_gib": gib(s["parts"]["opt_state"]["per_device_bytes"]),
           "state_gib": gib(s["bytes"]), "replicated_large": len(s["replicated_large"]),
           "undivided": len(s["undivided"])}
    if r["ran"]:
        out.update(init_s=round(t["init_s"], 1), step_s=[round(x, 1) for x in t["step_s"]],
                   eval_s=round(t["eval_s"], 1), loss=r["losses"], eval=r["eval"])
    return out
