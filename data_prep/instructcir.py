"""CLI of the InstructCIR data converter (`idmr_jax.tasks.universal.instructcir_data`, where the formats, the pairs
and the checks are described).

    python -m data_prep.instructcir --format {captions,coco,triplets} --src FILE --images DIR --out DIR \
        [--strict] [--shard-size N] [--workers N] [--max-image-bytes B] [--follow-external-symlinks] [--overwrite]

``captions`` / ``coco``: stage-1 image-caption pairs; ``triplets``: stage-2 (image, instruction, modified caption)
with the original caption as the hard negative. Exit status 2 on a conversion error (any bad row under --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_prep.safety_flags import add_safety_flags
from idmr_jax.tasks.universal.instructcir_data import FORMATS, RECORDS_PER_SHARD, ConversionError, convert_pairs


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.instructcir",
                                description="InstructCIR's caption pairs (jsonl or COCO captions) or instruction "
                                "triplets (jsonl) -> ArrayRecord shards of universal training pairs, with a manifest.")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="captions: jsonl {image, caption|captions}; coco: captions_*.json; triplets: jsonl "
                   "{image, instruction, modified_caption, original_caption}")
    p.add_argument("--src", required=True, help="the source file")
    p.add_argument("--images", required=True, help="the folder the image paths are relative to")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=RECORDS_PER_SHARD, help="pairs per shard (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes for image checks and shards")
    p.add_argument("--strict", action="store_true", help="fail on any bad row instead of skipping it")
    add_safety_flags(p, root="--images")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        manifest = convert_pairs(a.format, a.src, a.images, a.out, strict=a.strict, shard_size=a.shard_size,
                                 workers=a.workers, max_image_bytes=a.max_image_bytes,
                                 follow_external_symlinks=a.follow_external_symlinks, overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = manifest["counts"]
    print(f"instructcir/{a.format}: {c['pairs']} pairs of {c['images']} images, {c['skipped']} skipped "
          f"(manifest: {a.out}/manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
