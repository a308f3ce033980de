"""CLI of the M-BEIR training-pair converter (`idmr_jax.tasks.universal.mbeir_pairs`, where the pairs, the skips
and the memory use are described).

    python -m data_prep.mbeir_pairs --shards DIR --out DIR [--strict] [--shard-size N] [--workers N] [--overwrite]

``--shards`` is the output of ``python -m data_prep.mbeir`` (e.g. ``--split train --pool global``). Exit status 2
on a conversion error (any skipped query or dropped negative under --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from idmr_jax.tasks.universal.mbeir_pairs import RECORDS_PER_SHARD, ConversionError, convert_pairs


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.mbeir_pairs",
                                description="Converted M-BEIR shards (python -m data_prep.mbeir) -> ArrayRecord "
                                "shards of universal training pairs (query, first positive, hard negatives), with a "
                                "manifest.")
    p.add_argument("--shards", required=True, help="folder of queries-*, candidates-* and manifest.json written by "
                   "python -m data_prep.mbeir")
    p.add_argument("--out", required=True, help="output folder (train-*.array_record, manifest.json)")
    p.add_argument("--shard-size", type=int, default=RECORDS_PER_SHARD, help="pairs per shard (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards")
    p.add_argument("--strict", action="store_true", help="fail on any skipped query or dropped negative")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a manifest.json in --out that this tool did not write (default: refuse)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = convert_pairs(a.shards, a.out, strict=a.strict, shard_size=a.shard_size, workers=a.workers,
                                 overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"mbeir pairs: {c['pairs']} pairs of {c['queries']} queries, {c['hard_negatives']} hard negatives, "
          f"{c['skipped']} skipped (manifest: {a.out}/manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
