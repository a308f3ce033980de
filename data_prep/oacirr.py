"""CLI of the OACIRR release converter (`idmr_jax.tasks.oacir.release`, where the output and checks are described).

    python -m data_prep.oacirr --root /data/OACIRR --variant Fashion --split val --out /data/ar/fashion-val \
        [--num-shards 8] [--gallery-shards 4] [--max-side 512] [--workers 8] [--strict] \
        [--max-image-bytes 67108864] [--follow-external-symlinks] [--overwrite]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_prep.safety_flags import add_safety_flags
from idmr_jax.tasks.oacir.release import SPLITS, VARIANTS, ConversionError, convert


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.oacirr",
                                description="OACIRR (released layout) -> ArrayRecord shards of query and gallery "
                                "records, with a manifest.")
    p.add_argument("--root", required=True, help="OACIRR dataset root (holds OACIRR-Union/, OACIRR-Subset/, ...)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--out", required=True, help="output folder, one per variant and split")
    p.add_argument("--num-shards", type=int, default=None, help="query shards (default: ~1000 records each)")
    p.add_argument("--gallery-shards", type=int, default=None, help="gallery shards (default: ~1000 records each)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images longer than this (0: keep bytes)")
    p.add_argument("--workers", type=int, default=1, help="processes; one shard is one work unit")
    p.add_argument("--strict", action="store_true", help="fail on any bad entry instead of skipping it")
    add_safety_flags(p, root="--root")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        convert(a.root, a.variant, a.split, a.out, num_shards=a.num_shards, gallery_shards=a.gallery_shards,
                max_side=a.max_side, workers=a.workers, strict=a.strict, max_image_bytes=a.max_image_bytes,
                follow_external_symlinks=a.follow_external_symlinks, overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
