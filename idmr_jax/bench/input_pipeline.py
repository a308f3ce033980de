"""``input``: examples/s of the Grain train pipeline next to the rate at which the train step consumes them.

    python -m idmr_jax.bench input [--workers=0,1,2] [--step-config=demo] [--examples=512] [--out=F.json]

The pipeline is the trainer's (`idmr_jax.tasks.oacir.pipeline.train_iterator`: ArrayRecord read, JPEG decode,
TargetPad/resize/crop/normalise, box mask, tokenisation, batching), measured by `idmr_jax.tasks.oacir.throughput` on the
demo's real photos (the benchmark built once into the demo cache by `idmr_jax.data.demo_bench`, converted into one
query shard per worker). The consumption rate is the median
examples/s of the jitted train step at ``--step-config`` (the CPU demo config by default) on synthetic batches of
the same shapes. ``headroom = pipeline examples/s / step examples/s``: above 1 the input is not the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os

from idmr_jax.bench import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default="0,1,2", help="Grain worker process counts")
    p.add_argument("--examples", type=int, default=512, help="examples timed per worker count")
    p.add_argument("--step-config", default="demo", help="bench config whose train step consumes the batches")
    p.add_argument("--step-json", default="", help="take the step rate from this train_step result instead of "
                   "measuring it (its config must be --step-config)")
    p.add_argument("--demo-size", default="small", help="demo benchmark size (small | tiny)")
    p.add_argument("--demo-cache", default="", help="where the demo benchmark and shards live ('' = default)")
    p.add_argument("--devices", type=int, default=None, help="train step on the first N devices")
    p.add_argument("--read-threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed train steps")
    p.add_argument("--warmup", type=int, default=1)


def run(args: argparse.Namespace) -> dict:
    import jax

    from idmr_jax.bench import configs, jax_step
    from idmr_jax.tasks.oacir import throughput
    from idmr_jax.data.demo_bench.builder import build_demo_benchmark
    from idmr_jax.tasks.oacir import demo, release
    from idmr_jax.models.adafocal import grid

    config = configs.load(args.step_config, device_count=jax.device_count())
    mc = configs.model_config(config)
    gh, _ = grid(mc)
    image_size = int(mc.image_size)
    result = {"suite": "input", "machine": common.machine_info(), "step_config": args.step_config,
              "batch_size": int(config.data.batch_size)}

    # The demo benchmark, built or reused (the step config's data source stays synthetic), converted into as many
    # query shards as the largest worker count: each Grain worker reads whole shards.
    workers = common.parse_ints(args.workers)
    d = configs.load("demo").data
    cache = args.demo_cache or demo.default_cache()
    root = build_demo_benchmark(os.path.join(cache, "benchmark"), seed=d.demo_seed, size=args.demo_size)
    train_dir = os.path.join(cache, f"bench-input-{args.demo_size}-seed{d.demo_seed}-{max(workers)}")
    release.convert(root, "Demo", "train", train_dir, num_shards=max(max(workers), 1))
    pipe = throughput.measure(train_dir, workers,
                              batch_size=int(config.data.batch_size), examples=args.examples,
                              image_size=image_size, patch=image_size // gh, read_threads=args.read_threads)
    result["pipeline"] = pipe

    if args.step_json:
        from etils import epath

        measured = json.loads(epath.Path(args.step_json).read_text())
        if measured.get("suite") != "train_step" or measured.get("config") != args.step_config:
            raise ValueError(f"{args.step_json}: not a train_step result for --step-config={args.step_config} "
                             f"(suite {measured.get('suite')!r}, config {measured.get('config')!r})")
        step = {**measured["jax"], "from": args.step_json}
    else:
        js = jax_step.build(config, devices=args.devices)
        js.compile()
        step = common.summarize(common.time_calls(js.run, warmup=max(args.warmup, 1), reps=args.reps,
                                                  sync=js.sync))
        step["examples_per_s"] = js.batch_size / step["median_s"]
    result["train_step"] = step
    result["headroom"] = {str(r["num_workers"]): r["examples_per_s"] / step["examples_per_s"]
                          for r in pipe["results"]}
    result["input_is_bottleneck"] = {w: h < 1.0 for w, h in result["headroom"].items()}
    return result
