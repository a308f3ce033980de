"""The laptop demo's data: a small OACIR benchmark from real photos, built once and cached, then converted.

``config.data.source == "demo"``: the benchmark (`data_prep.demo_bench`, deterministic from a seed) is written
in the released OACIRR layout under the cache, converted by `data_prep.oacirr` like the real dataset, and the
config's ``train_dir`` / ``val_dir`` are pointed at the shards. Both steps reuse what is already there.
"""

from __future__ import annotations

import os

import jax
from absl import logging


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idmr_jax", "demo")


def prepare(config) -> None:
    """Builds (or reuses) the demo benchmark and its shards and points ``config.data`` at them."""
    from data_prep import demo_bench, oacirr

    d = config.data
    cache = d.demo_cache or default_cache()
    shards = os.path.join(cache, f"shards-{d.demo_size}-seed{d.demo_seed}")
    if jax.process_index() == 0:
        root = demo_bench.build_demo_benchmark(os.path.join(cache, "benchmark"), seed=d.demo_seed, size=d.demo_size)
        for split in ("train", "val"):
            result = oacirr.convert(root, "Demo", split, os.path.join(shards, split))
            logging.info("demo %s shards: %s", split, result)
    d.train_dir = os.path.join(shards, "train")
    d.val_dir = os.path.join(shards, "val")
    d.source = "arrayrecord"
