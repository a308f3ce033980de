"""CLI of the M-BEIR converter (`idmr_jax.tasks.universal.mbeir_convert`, where the output and checks are described).

    python -m data_prep.mbeir --root DIR --split {train,val,test} --out DIR [--keys k1,k2] [--pool local|global] \
        [--strict] [--workers N] [--max-image-bytes B] [--follow-external-symlinks] [--overwrite]

``--keys`` defaults to the 16 test keys (`idmr_jax.tasks.universal.mbeir.TEST_KEYS`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_prep.safety_flags import add_safety_flags
from idmr_jax.tasks.universal import mbeir
from idmr_jax.tasks.universal.mbeir_convert import POOL_MODES, ConversionError, convert


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.mbeir",
                                description="The M-BEIR release (UniIR) -> ArrayRecord shards of universal query and "
                                "candidate records, with a manifest.")
    p.add_argument("--root", required=True, help="the release folder (query/, qrels/, cand_pool/, instructions/, "
                   "mbeir_images/)")
    p.add_argument("--split", required=True, choices=mbeir.SPLITS)
    p.add_argument("--out", required=True, help="output folder, one per split and pool")
    p.add_argument("--keys", default=",".join(mbeir.TEST_KEYS),
                   help="comma-separated query sets, e.g. cirr_task7,webqa_task1 (default: the 16 test keys)")
    p.add_argument("--pool", default="local", choices=POOL_MODES,
                   help="local: each key's own pool; global: the split's union pool (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes for image checks and shards")
    p.add_argument("--strict", action="store_true", help="fail on any bad entry instead of skipping it")
    add_safety_flags(p, root="--root")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    keys = [k.strip() for k in a.keys.split(",") if k.strip()]
    try:
        manifest = convert(a.root, a.split, a.out, keys=keys, pool=a.pool, strict=a.strict, workers=a.workers,
                           max_image_bytes=a.max_image_bytes, follow_external_symlinks=a.follow_external_symlinks,
                           overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"mbeir/{a.split} ({a.pool} pool): {c['queries']} queries, {c['candidates']} candidates, "
          f"{c['skipped']} skipped (manifest: {a.out}/manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
