"""CLI of the IDMR cross-domain data synthesis (`idmr_jax.tasks.idmr.synth.synthesis`, where the recipe, the
output and the options are described).

    python -m data_prep.idmr_synth --annotations instances_train2017.json --images train2017/ --out OUT \\
        [--min-side 32] [--min-area-ratio 0.01] [--max-area-ratio 0.8] [--context-pad 0.0] \\
        [--clip-checkpoint CLIP_DIR --clip-threshold 0.2] [--captioner template|llava --llava-checkpoint DIR] \\
        [--val-fraction 0.05 --split-by image|instance|category] [--seed 0] [--max-side 0] [--workers 4] \\
        [--strict] [--max-image-bytes 67108864] [--follow-external-symlinks] [--overwrite]
    python -m data_prep.idmr_synth --tfds-name coco/2017 --tfds-data-dir DIR --split train --out OUT ...
    python -m data_prep.idmr_synth --demo-root ~/.cache/idmr_jax/demo [--demo-split val] --out OUT ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data_prep.safety_flags import add_safety_flags
from idmr_jax.data.image_files import ReadRules
from idmr_jax.data.shards import ConversionError, process_pool
from idmr_jax.tasks.idmr.synth import geometry, synthesis
from idmr_jax.tasks.idmr.synth.captions import MllmCaptioner
from idmr_jax.tasks.idmr.synth.clip_filter import DEFAULT_THRESHOLD
from idmr_jax.tasks.idmr.synth.sources import load_coco, load_demo, load_tfds
from idmr_jax.tasks.idmr.synth.synthesis import DEMO_FILTERS, RECORDS_PER_SHARD, SPLIT_MODES, SynthOptions, synthesize


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on bad input under --strict or an unusable source)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.idmr_synth",
                                description=synthesis.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", help="COCO-format detection JSON (COCO, Objects365, converted OpenImages)")
    src.add_argument("--tfds-name", help="a TFDS-prepared detection dataset, e.g. coco/2017 (ArrayRecord)")
    src.add_argument("--demo-root", help="the demo benchmark root (data_prep.demo_bench --out)")
    p.add_argument("--images", help="image folder the COCO file names are relative to (with --annotations)")
    p.add_argument("--source-name", help="source label in ids and records (default: coco / demo / tfds:NAME)")
    p.add_argument("--tfds-data-dir", help="TFDS data_dir holding the prepared dataset")
    p.add_argument("--split", "--tfds-split", dest="tfds_split", default="train", help="TFDS split to read")
    p.add_argument("--demo-split", choices=("train", "val"), help="only this split of the demo benchmark")
    p.add_argument("--out", required=True, help="output folder (local), one synthesis per folder")
    d = geometry.FilterSpec()
    dd = DEMO_FILTERS
    p.add_argument("--min-side", type=float, help=f"min box width and height, pixels ({d.min_side:g}; demo "
                   f"{dd.min_side:g})")
    p.add_argument("--min-area-ratio", type=float, help=f"min box area / image area ({d.min_area_ratio:g}; demo "
                   f"{dd.min_area_ratio:g})")
    p.add_argument("--max-area-ratio", type=float, help=f"max box area / image area ({d.max_area_ratio:g}; demo "
                   f"{dd.max_area_ratio:g})")
    p.add_argument("--context-pad", type=float, default=0.0, help="crop margin, fraction of the box size")
    p.add_argument("--clip-checkpoint", help="transformers CLIPModel folder: enables the CLIP-score filter")
    p.add_argument("--clip-threshold", type=float, default=DEFAULT_THRESHOLD, help="keep crops scoring above this")
    p.add_argument("--clip-batch", type=int, default=32)
    p.add_argument("--captioner", choices=("template", "llava"), default="template")
    p.add_argument("--llava-checkpoint", help="converted LLaVA folder (with its tokenizer) for --captioner llava")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--split-by", choices=SPLIT_MODES, default="image")
    p.add_argument("--max-side", type=int, default=0, help="downsize full images longer than this (0: keep)")
    p.add_argument("--records-per-shard", type=int, default=RECORDS_PER_SHARD)
    p.add_argument("--limit-images", type=int, default=None, help="use only the first N images")
    p.add_argument("--workers", type=int, default=1, help="processes for probing and shard writing")
    p.add_argument("--strict", action="store_true", help="fail on any bad input instead of skipping it")
    add_safety_flags(p, root="the image folder")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    base = DEMO_FILTERS if a.demo_root else d
    try:
        options = SynthOptions(
            filters=geometry.FilterSpec(
                base.min_side if a.min_side is None else a.min_side,
                base.min_area_ratio if a.min_area_ratio is None else a.min_area_ratio,
                base.max_area_ratio if a.max_area_ratio is None else a.max_area_ratio, a.context_pad),
            clip_threshold=a.clip_threshold, seed=a.seed, val_fraction=a.val_fraction, split_by=a.split_by,
            max_side=a.max_side, records_per_shard=a.records_per_shard, limit_images=a.limit_images,
            strict=a.strict, read_rules=ReadRules(a.max_image_bytes, a.follow_external_symlinks))
    except ValueError as e:
        p.error(str(e))
    try:
        if a.annotations:
            if not a.images:
                p.error("--annotations needs --images")
            loaded = load_coco(a.annotations, a.images, source=a.source_name or "coco")
        elif a.demo_root:
            loaded = load_demo(a.demo_root, a.demo_split, source=a.source_name or "demo")
        else:
            with process_pool(a.workers) as pool:
                loaded = load_tfds(a.tfds_name, a.tfds_split, a.tfds_data_dir, pool=pool)
            if a.source_name:
                loaded.name = a.source_name
        scorer = captioner = None
        if a.clip_checkpoint:
            from idmr_jax.tasks.idmr.synth.clip_filter import ClipScorer

            scorer = ClipScorer(a.clip_checkpoint, batch_size=a.clip_batch)
        if a.captioner == "llava":
            if not a.llava_checkpoint:
                p.error("--captioner llava needs --llava-checkpoint")
            from idmr_jax.tasks.idmr.synth.captions import llava_generate

            generate, name = llava_generate(a.llava_checkpoint)
            captioner = MllmCaptioner(generate, name)
        synthesize(loaded, a.out, options=options, scorer=scorer, captioner=captioner, workers=a.workers,
                   overwrite=a.overwrite)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
