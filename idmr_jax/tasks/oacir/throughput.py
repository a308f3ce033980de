"""Input-pipeline throughput: examples/s of the OACIR train pipeline (read + decode + transform + batch).

    python -m idmr_jax.tasks.oacir.throughput --shards DIR [--workers 0,1,2] [--batch-size 32] [--examples 512]
        [--image-size 224] [--patch 14] [--read-threads 2]

``DIR`` is a converted train folder (`python -m data_prep.oacirr ... --split train`). For each worker count the
pipeline of `idmr_jax.tasks.oacir.pipeline.train_iterator` is built fresh; the first batch (worker start-up, file
opening, tokenizer loading) is timed separately as ``startup_s`` and excluded, then at least ``--examples``
examples are drawn and timed. Nothing runs on an accelerator: this is the host-side cost per example, the number
to compare with the trainer's ``examples_per_s``. Prints one JSON object and returns it from `measure`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence


def measure(shards: str, workers: Sequence[int] = (0, 1, 2), *, batch_size: int = 32, examples: int = 512,
            image_size: int = 224, patch: int = 14, read_threads: int = 2, seed: int = 0) -> dict:
    """Examples/s of the train pipeline over `shards` for each worker count in `workers` (see module doc)."""
    import ml_collections

    from idmr_jax.tasks.oacir import pipeline

    spec = pipeline.ImageSpec(size=image_size, grid=(image_size // patch, image_size // patch), patch=patch)
    results = []
    for num_workers in workers:
        config = ml_collections.ConfigDict()
        config.data = ml_collections.ConfigDict(dict(
            train_dir=shards, batch_size=batch_size, num_workers=num_workers, shuffle_seed=seed, tokenizer="",
            max_text_len=32, text_entity=False, roi_crop=False, read_threads=read_threads))
        t0 = time.perf_counter()
        with pipeline.train_iterator(config, spec=spec) as it:
            next(it)
            startup = time.perf_counter() - t0
            n_batches = max(1, -(-examples // batch_size))
            t1 = time.perf_counter()
            for _ in range(n_batches):
                next(it)
            dt = time.perf_counter() - t1
        results.append({"num_workers": num_workers, "examples": n_batches * batch_size, "seconds": round(dt, 3),
                        "examples_per_s": round(n_batches * batch_size / dt, 2), "startup_s": round(startup, 2)})
    return {"shards": os.path.abspath(shards), "batch_size": batch_size, "image_size": image_size,
            "read_threads": read_threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "results": results}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="converted train folder (queries-*/gallery-* shards)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--examples", type=int, default=512, help="examples timed per worker count")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--read-threads", type=int, default=2)
    args = parser.parse_args(argv)
    out = measure(args.shards, [int(w) for w in args.workers.split(",") if w.strip()], batch_size=args.batch_size,
                  examples=args.examples, image_size=args.image_size, patch=args.patch,
                  read_threads=args.read_threads)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":  # the guard matters: Grain spawns worker processes that re-import this module
    main()
