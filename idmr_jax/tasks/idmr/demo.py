"""The IDMR laptop demo's data: the real-photo demo benchmark turned into IDMR triplets, built once and cached.

For ``config.data.source == "demo"`` (`idmr_jax.tasks.prepare_data` calls `prepare`): `idmr_jax.data.demo_bench`
builds the benchmark (deterministic from a seed; the same photos as the OACIR demo),
`idmr_jax.tasks.idmr.synth.sources.demo_coco` reads it as COCO (one annotated instance per image, the instance id
kept across images), and `idmr_jax.tasks.idmr.synth` writes triplet shards with an instance-disjoint train/val
split (the real synthesis path, template captions naming the scene and position). Train and val read the same
folder (the split is in the shard names). Everything is reused when already there.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from absl import logging

from idmr_jax import paths
from idmr_jax.data.demo_bench import builder
from idmr_jax.tasks.idmr.synth import synthesis
from idmr_jax.tasks.idmr.synth.sources import demo_coco, load_coco

VAL_FRACTION = 0.3


def default_cache() -> str:
    """The demo cache when ``config.data.demo_cache`` is empty: ``~/.cache/idmr_jax/idmr_demo``."""
    return paths.cache_dir("idmr_demo")


def prepare(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """Builds (or reuses) the demo triplets, on process 0 only -> (train_dir, val_dir) (one folder).

    Every process gets the paths; the others must wait for process 0 before reading them (`prepare_data` does)."""
    d = config.data
    cache = d.demo_cache or default_cache()
    out = os.path.join(cache, f"triplets-{d.demo_size}-seed{d.demo_seed}")
    if jax.process_index() == 0:
        root = builder.build_demo_benchmark(os.path.join(cache, "benchmark"), seed=d.demo_seed, size=d.demo_size)
        coco, image_dir = demo_coco(str(root))
        # Every pasted instance is a valid object: keep small ones too (the demo photos are 320 px).
        options = synthesis.SynthOptions(filters=synthesis.DEMO_FILTERS, seed=d.demo_seed,
                                         val_fraction=VAL_FRACTION, split_by="instance")
        result = synthesis.synthesize(load_coco(coco, image_dir, source="demo"), out, options=options)
        logging.info("IDMR demo triplets in %s: %s", out, result.manifest.get("counts"))
    return out, out
