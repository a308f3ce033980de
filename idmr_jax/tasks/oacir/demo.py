"""The laptop demo's data: a small OACIR benchmark from real photos, built once and cached, then converted.

For ``config.data.source == "demo"`` (`idmr_jax.tasks.prepare_data` calls `prepare`): the benchmark
(`idmr_jax.data.demo_bench`, deterministic from a seed) is written in the released OACIRR layout under the cache
and converted by `idmr_jax.tasks.oacir.release` like the real dataset. Both steps reuse what is already there.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from idmr_jax import paths
from idmr_jax.data.demo_bench import builder
from idmr_jax.tasks.oacir import release


def default_cache() -> str:
    """The demo cache when ``config.data.demo_cache`` is empty: ``~/.cache/idmr_jax/demo``."""
    return paths.cache_dir("demo")


def _split(config: ml_collections.ConfigDict) -> str:
    """``config.data.demo_split``, checked (`idmr_jax.data.demo_bench.plan.KINDS`)."""
    kind = config.data.get("demo_split", "standard")
    if kind not in builder.VARIANTS:
        raise ValueError(f"config.data.demo_split = {kind!r}: choose from {sorted(builder.VARIANTS)}")
    return kind


def _cache_name(config: ml_collections.ConfigDict, name: str) -> str:
    """``<cache>/<name>`` for the standard demo split, ``<cache>/<name>-<split>`` for another."""
    kind = _split(config)
    return os.path.join(config.data.demo_cache or default_cache(), name if kind == "standard" else f"{name}-{kind}")


def benchmark_dir(config: ml_collections.ConfigDict) -> str:
    """Where the demo benchmark of ``config.data.demo_split`` is built: ``<cache>/benchmark`` for the standard one,
    ``<cache>/benchmark-context`` for the context one."""
    return _cache_name(config, "benchmark")


def prepare(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """Builds (or reuses) the demo benchmark and its shards, on process 0 only -> (train_dir, val_dir).

    Every process gets the paths; the others must wait for process 0 before reading them (`prepare_data` does)."""
    d = config.data
    kind = _split(config)
    shards = f"{_cache_name(config, 'shards')}-{d.demo_size}-seed{d.demo_seed}"
    if jax.process_index() == 0:
        root = builder.build_demo_benchmark(benchmark_dir(config), seed=d.demo_seed, size=d.demo_size, kind=kind)
        for split in ("train", "val"):
            result = release.convert(root, builder.VARIANTS[kind], split, os.path.join(shards, split))
            logging.info("demo %s shards: %s", split, result)
    return os.path.join(shards, "train"), os.path.join(shards, "val")
