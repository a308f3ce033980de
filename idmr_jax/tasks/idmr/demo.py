"""The IDMR laptop demo's data: the real-photo demo benchmark turned into IDMR triplets, built once and cached.

``config.data.source == "demo"``: `data_prep.demo_bench` builds the benchmark (deterministic from a seed; the
same photos as the OACIR demo), `data_prep.idmr.sources.demo_coco` reads it as COCO (one annotated instance per
image, the instance id kept across images), and `data_prep.idmr_synth` writes triplet shards with an
instance-disjoint train/val split (the real synthesis path, template captions naming the scene and position).
``config.data.train_dir`` / ``val_dir`` then point at the shards. Everything is reused when already there.
"""

from __future__ import annotations

import os

import jax
from absl import logging

VAL_FRACTION = 0.3


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idmr_jax", "idmr_demo")


def prepare(config) -> None:
    """Builds (or reuses) the demo triplets and points ``config.data`` at them."""
    from data_prep import demo_bench, idmr_synth
    from data_prep.idmr import geometry
    from data_prep.idmr.sources import demo_coco, load_coco

    d = config.data
    cache = d.demo_cache or default_cache()
    out = os.path.join(cache, f"triplets-{d.demo_size}-seed{d.demo_seed}")
    if jax.process_index() == 0:
        root = demo_bench.build_demo_benchmark(os.path.join(cache, "benchmark"), seed=d.demo_seed, size=d.demo_size)
        coco, image_dir = demo_coco(str(root))
        options = idmr_synth.SynthOptions(
            # Every pasted instance is a valid object: keep small ones too (the demo photos are 320 px).
            filters=geometry.FilterSpec(min_side=8, min_area_ratio=0.0, max_area_ratio=1.0),
            seed=d.demo_seed, val_fraction=VAL_FRACTION, split_by="instance")
        result = idmr_synth.synthesize(load_coco(coco, image_dir, source="demo"), out, options=options)
        logging.info("IDMR demo triplets in %s: %s", out, result.manifest.get("counts"))
    d.train_dir = d.val_dir = out
    d.source = "arrayrecord"
