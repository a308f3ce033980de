"""CLI of the CIR benchmark converter (`idmr_jax.tasks.cir.convert`, where the output and checks are described).

    python -m data_prep.cir --benchmark {cirr,circo,fashioniq,genecis} --root DIR --split {val,test} --out DIR \
        [--strict] [--workers N] [--max-image-bytes B] [--follow-external-symlinks] [--overwrite]

GeneCIS has one split, read as ``val``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_prep.safety_flags import add_safety_flags
from idmr_jax.tasks.cir import benchmarks
from idmr_jax.tasks.cir.convert import ConversionError, convert


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.cir",
                                description="A CIR benchmark release (CIRR, CIRCO, FashionIQ, GeneCIS) -> ArrayRecord "
                                "shards of image and query records, with a manifest.")
    p.add_argument("--benchmark", required=True, choices=benchmarks.names())
    p.add_argument("--root", required=True, help="the release's folder (see README 'Benchmarks' for each layout)")
    p.add_argument("--split", required=True, choices=("val", "test"), help="GeneCIS: val (its only split)")
    p.add_argument("--out", required=True, help="output folder, one per benchmark and split")
    p.add_argument("--workers", type=int, default=1, help="processes for image checks and shards")
    p.add_argument("--strict", action="store_true", help="fail on any bad entry instead of skipping it")
    add_safety_flags(p, root="--root")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = convert(a.benchmark, a.root, a.split, a.out, strict=a.strict, workers=a.workers,
                           max_image_bytes=a.max_image_bytes, follow_external_symlinks=a.follow_external_symlinks,
                           overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"{a.benchmark}/{a.split}: {c['queries']} queries, {c['images']} images, {c['skipped']} skipped "
          f"(manifest: {a.out}/manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
