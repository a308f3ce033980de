"""IDMR cross-domain data synthesis: detection annotations -> (instance crop, location caption, full image)
triplets as ArrayRecord shards, with a manifest and a report of every instance not turned into a triplet.

    python -m data_prep.idmr_synth --annotations instances_train2017.json --images train2017/ --out OUT \\
        [--min-side 32] [--min-area-ratio 0.01] [--max-area-ratio 0.8] [--context-pad 0.0] \\
        [--clip-checkpoint CLIP_DIR --clip-threshold 0.2] [--captioner template|llava --llava-checkpoint DIR] \\
        [--val-fraction 0.05 --split-by image|instance|category] [--seed 0] [--max-side 0] [--workers 4] [--strict]
    python -m data_prep.idmr_synth --tfds-name coco/2017 --tfds-data-dir DIR --split train --out OUT ...
    python -m data_prep.idmr_synth --demo-root ~/.cache/idmr_jax/demo [--demo-split val] --out OUT ...

The recipe (IDMR, arXiv 2504.00954; REFERENCE.md section 4): crop every detection instance by its box, keep crops
that pass the size / area-ratio filters and, optionally, whose CLIP score with "a photo of a {category}" exceeds
the threshold (paper: 0.2), caption the *full* image with the instance's location and surroundings (not the
object itself), and store (crop, caption, full image). Inputs and their formats: `data_prep.idmr.sources`.

Per instance, the first failing check decides its fate: bad record (see sources) -> unusable image (missing,
undecodable, size differs from the annotation) -> ``crowd`` -> box outside the image (``box_outside``; boxes
partly outside are clipped and counted) -> ``too_small`` -> ``area_ratio_low`` / ``area_ratio_high`` ->
``clip_score_low`` -> ``empty_caption``. Bad input (records, images, boxes outside) is itemised in the report
with file, record index and field (``--strict`` makes it an error); filtered instances are listed by annotation id
per reason. Every source annotation is accounted for: ``counts.instances.total == kept + sum(skipped)``.

Output in ``--out`` (local folder, one synthesis per folder):

- ``train-IIIII-of-NNNNN.array_record`` and, with ``--val-fraction``, ``val-...``: one `idmr_jax.tasks.idmr.records`
  record per kept instance, in source order (images, then annotations);
- ``manifest.json``: tool, schema, arguments, source description, counts, per-shard records/sha256;
- ``report.json``: counts per skip reason, every bad-input entry, the filtered annotation ids per reason, CLIP
  score statistics.

Splits (``--val-fraction f``, chosen with ``--seed``): ``image`` puts f of the images (all their triplets) in val,
so no full image is in both splits; ``instance`` puts f of the instance ids in val (an image with several objects
can feed both splits; with the demo's cross-image instance ids no object identity is in both); ``category`` moves
whole categories to val until it holds >= f of the triplets (category-disjoint, a zero-shot split).

Determinism: the output bytes are a function of the inputs, the options and the seed (template captions are
seeded per annotation; JPEG encoding has fixed settings; no timestamps). Resume: finished shards are reused
(`data_prep.shards`); image probes, CLIP scores and MLLM captions are cached in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import logging
import math
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from data_prep import images
from data_prep.idmr import geometry, planning
from data_prep.idmr.captions import MllmCaptioner, TemplateCaptioner
from data_prep.idmr.clip_filter import DEFAULT_THRESHOLD, PROMPT, Scorer
from data_prep.idmr.planning import FILTER_CODES, TOOL_VERSION, assign_splits
from data_prep.idmr.sources import IMAGE, INSTANCE, Loaded, demo_coco, load_coco, load_demo, load_tfds
from data_prep.oacirr import ConversionError
from data_prep.shards import (
    WRITER_OPTIONS,
    ShardPlan,
    ShardState,
    json_digest,
    process_pool,
    shard_name,
    split_contiguous,
    write_json_atomic,
    write_shards,
)
from idmr_jax.tasks.idmr import records as triplets

MANIFEST, REPORT = "manifest.json", "report.json"
SPLIT_MODES = ("image", "instance", "category")
RECORDS_PER_SHARD = 1000
# The demo benchmark's pasted instances are small in small images: keep every one of them.
DEMO_FILTERS = geometry.FilterSpec(min_side=8, min_area_ratio=0.0, max_area_ratio=1.0)

__all__ = ["DEMO_FILTERS", "FILTER_CODES", "TOOL_VERSION", "ConversionError", "SynthOptions", "SynthResult",
           "assign_splits", "demo_coco", "load_coco", "load_demo", "load_tfds", "main", "synthesize"]


@dataclasses.dataclass(frozen=True)
class SynthOptions:
    """Everything besides the source that decides the output (see the module docstring)."""

    filters: geometry.FilterSpec = geometry.FilterSpec()
    clip_threshold: float = DEFAULT_THRESHOLD
    seed: int = 0
    val_fraction: float = 0.0
    split_by: str = "image"
    max_side: int = 0  # re-encode full images whose longer side exceeds this (0: keep the size)
    records_per_shard: int = RECORDS_PER_SHARD
    limit_images: int | None = None  # only the first N images of the source (quick runs)
    strict: bool = False

    def __post_init__(self):
        if self.split_by not in SPLIT_MODES:
            raise ValueError(f"split_by must be one of {SPLIT_MODES}, got {self.split_by!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.records_per_shard < 1 or self.max_side < 0:
            raise ValueError("records_per_shard must be >= 1 and max_side >= 0")


@dataclasses.dataclass(frozen=True)
class SynthResult:
    """What `synthesize` did: the manifest and report it wrote, and which shard files it wrote or reused."""

    manifest: dict
    report: dict
    written: list[str]
    reused: list[str]


# --- shard production (worker processes) -------------------------------------------------------------------------


def _stored_image(data: bytes, im: Image.Image, max_side: int) -> tuple[bytes, tuple[int, int]]:
    """The full image as stored: its own bytes when they are a JPEG within ``max_side``, else a JPEG re-encode
    (Lanczos-downsized to ``max_side`` when larger)."""
    w, h = im.size
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        return images.encode_jpeg(im.convert("RGB").resize(new, Image.Resampling.LANCZOS)), new
    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
        return data, (w, h)
    return images.encode_jpeg(im), (w, h)


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded triplets of one shard, in plan order."""
    reader, max_side = task["reader"], task["max_side"]
    ref = stored = im = None
    for it in task["items"]:
        if it["ref"] != ref:
            ref = it["ref"]
            data = reader.read(ref)
            if len(data) != it["file_size"]:
                raise ConversionError(f"{it['file_name']}: changed since it was checked "
                                      f"({len(data)} != {it['file_size']} bytes)")
            im = planning.decode_image(data)
            stored, size = _stored_image(data, im, max_side)
        orig = (it["width"], it["height"])
        crop = images.encode_jpeg(im.crop(tuple(it["rect"])))
        yield triplets.encode(triplets.TripletRecord(
            crop_jpeg=crop, image_jpeg=stored, caption=it["caption"], category=it["category"],
            instance_id=it["instance_id"], annotation_id=it["annotation_id"], image_id=it["image_id"],
            box=images.scale_box(tuple(it["box"]), orig, size), crop_box=images.scale_box(tuple(it["rect"]), orig,
                                                                                           size),
            image_size=size, source=it["source"], captioner=it["captioner"], clip_score=it["clip_score"],
            source_index=it["source_index"]))


# --- the synthesis ----------------------------------------------------------------------------------------------


def synthesize(loaded: Loaded, out: str | os.PathLike, *, options: SynthOptions = SynthOptions(),
               scorer: Scorer | None = None, captioner: Any = None, workers: int = 1) -> SynthResult:
    """Synthesises triplets from a loaded source (`load_coco`, `load_tfds`, `load_demo`)
    into ``out``; see the module docstring. ``scorer`` enables the CLIP filter; ``captioner`` defaults to
    `TemplateCaptioner(options.seed)`. Raises `ConversionError` under ``options.strict`` on any bad input (the
    message lists each entry by file, record and field)."""
    captioner = captioner or TemplateCaptioner(options.seed)
    out = os.path.abspath(os.fspath(out))
    os.makedirs(out, exist_ok=True)
    try:
        state = ShardState(out, {"tool": "data_prep.idmr_synth", "source": loaded.name})
    except RuntimeError as e:
        raise ConversionError(str(e)) from e
    entries = loaded.entries
    beyond = 0  # annotations of images past --limit-images: counted, not listed (they are most of a quick run)
    if options.limit_images is not None:
        entries, rest = entries[: options.limit_images], entries[options.limit_images :]
        beyond = sum(len(e.annotations) for e in rest)

    with process_pool(workers) as pool:
        planning.probe_all(loaded, entries, out, pool, workers)
        cands, skips, filtered, clipped = planning.candidates(loaded, entries, options.filters)
        skips = loaded.skips + skips
        if options.strict and skips:
            lines = "\n".join(s.describe() for s in skips)
            raise ConversionError(f"--strict: {len(skips)} bad input entr{'y' if len(skips) == 1 else 'ies'}:\n"
                                  f"{lines}")
        for s in skips:
            logging.warning("skipped: %s", s.describe())
        scores = []
        if scorer is not None:
            planning.score(cands, loaded, scorer, out)
            scores = [c["clip_score"] for c in cands]
            low = [c for c in cands if not c["clip_score"] > options.clip_threshold]  # paper: keep score > 0.2
            filtered["clip_score_low"] = [c["annotation_id"] for c in low]
            cands = [c for c in cands if c["clip_score"] > options.clip_threshold]
        planning.caption(cands, loaded, captioner, out)
        filtered["empty_caption"] = [c["annotation_id"] for c in cands if not c["caption"]]
        cands = [c for c in cands if c["caption"]]

        items = []
        for c in cands:
            e, a = c["entry"], c["ann"]
            items.append({
                "ref": e.ref, "file_name": e.file_name, "file_size": e.probe["size"], "stat": e.probe.get("stat"),
                "width": c["width"], "height": c["height"], "box": list(c["box"]), "rect": list(c["rect"]),
                "caption": c["caption"], "category": a.category, "annotation_id": c["annotation_id"],
                "instance_id": f"{loaded.name}:{a.instance_id}" if a.instance_id else c["annotation_id"],
                "image_id": f"{loaded.name}:{e.image_id}", "source": loaded.name, "captioner": captioner.name,
                "clip_score": c.get("clip_score"), "source_index": a.index})
        key = {"image": "image_id", "instance": "instance_id", "category": "category"}[options.split_by]
        sides = assign_splits([it[key] for it in items], options.val_fraction, options.seed,
                              by_category=options.split_by == "category")
        by_split = {s: [it for it, side in zip(items, sides) if side == s] for s in ("train", "val")}
        plans: dict[str, list[ShardPlan]] = {}
        reader_desc = {"type": type(loaded.reader).__name__, **dataclasses.asdict(loaded.reader)}
        for split, its in by_split.items():
            if split == "val" and not its:
                plans[split] = []
                continue
            num = max(1, math.ceil(len(its) / options.records_per_shard))
            plans[split] = []
            for i, (start, stop) in enumerate(split_contiguous(len(its), num)):
                task = {"reader": loaded.reader, "items": its[start:stop], "max_side": options.max_side}
                digest = json_digest({"tool": TOOL_VERSION, "schema": triplets.SCHEMA_VERSION,
                                      "writer": WRITER_OPTIONS, "reader": reader_desc, "items": task["items"],
                                      "max_side": options.max_side})
                plans[split].append(ShardPlan(shard_name(split, i, num), digest, task))
        infos, written, reused = write_shards(out, plans["train"] + plans["val"], _produce, state, pool=pool)
    expected = {p.file for ps in plans.values() for p in ps}
    for stale in sorted(glob.glob(os.path.join(glob.escape(out), "*.array_record"))):
        if os.path.basename(stale) not in expected:
            logging.warning("%s is not part of this synthesis (left in place; read shards via the manifest)", stale)

    by_file = {i.file: dataclasses.asdict(i) for i in infos}
    skipped = Counter(s.code for s in skips if s.action == INSTANCE)
    skipped.update({code: len(ids) for code, ids in filtered.items() if ids})
    if beyond:
        skipped["beyond_limit"] = beyond
    total = loaded.counts["annotations"]
    counts = {
        "source": loaded.counts,
        "images": {"considered": len(entries), "usable": sum(e.probe["error"] is None for e in entries),
                   "with_triplets": len({it["image_id"] for it in items}),
                   "skipped": sum(s.action == IMAGE for s in skips)},
        "instances": {"total": total, "kept": len(items), "skipped": dict(sorted(skipped.items()))},
        "triplets": {s: len(v) for s, v in by_split.items()},
        "categories": {s: len({it["category"] for it in v}) for s, v in by_split.items()},
        "boxes_clipped": int(clipped),
        "bad_input_entries": len(skips),
    }
    if len(items) + sum(skipped.values()) != total:  # every annotation must be accounted for exactly once
        raise AssertionError(f"instance accounting broken: {len(items)} kept + {dict(skipped)} != {total}")
    args = {"filters": dataclasses.asdict(options.filters), "clip_threshold": options.clip_threshold,
            "scorer": None if scorer is None else scorer.name, "captioner": captioner.name, "seed": options.seed,
            "val_fraction": options.val_fraction, "split_by": options.split_by, "max_side": options.max_side,
            "records_per_shard": options.records_per_shard, "limit_images": options.limit_images,
            "strict": options.strict}
    manifest = {
        "tool": {"name": "data_prep.idmr_synth", "version": TOOL_VERSION},
        "record_schema": {"module": "idmr_jax.tasks.idmr.records", "version": triplets.SCHEMA_VERSION},
        "writer_options": WRITER_OPTIONS,
        "source": {**loaded.describe, "name": loaded.name, **_annotation_digest(loaded)},
        "args": args,
        "counts": counts,
        "shards": {s: [by_file[p.file] for p in ps] for s, ps in plans.items()},
        "report": REPORT,
    }
    report = {
        "counts": counts,
        "skipped": [dataclasses.asdict(s) for s in skips],
        "filtered": {code: ids for code, ids in filtered.items()},
        "clip": None if scorer is None else {
            "scorer": scorer.name, "prompt": PROMPT, "threshold": options.clip_threshold, "scored": len(scores),
            "min": min(scores, default=None), "max": max(scores, default=None),
            "mean": float(np.mean(scores)) if scores else None},
    }
    write_json_atomic(os.path.join(out, REPORT), report)
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("%s: %d triplets (%s) from %d annotations; skipped %s; wrote %d shards, reused %d", loaded.name,
                 len(items), counts["triplets"], total, dict(skipped), len(written), len(reused))
    return SynthResult(manifest, report, written, reused)


def _annotation_digest(loaded: Loaded) -> dict:
    """sha256 of the annotation file, when there is one (the record of what the triplets came from)."""
    path = loaded.describe.get("annotations")
    if loaded.describe["kind"] != "coco" or not path or path == "<dict>":
        return {}
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"annotations_sha256": h.hexdigest()}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on bad input under --strict or an unusable source)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.idmr_synth", description=__doc__.split("\n\n")[0],
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
            strict=a.strict)
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
            from data_prep.idmr.clip_filter import ClipScorer

            scorer = ClipScorer(a.clip_checkpoint, batch_size=a.clip_batch)
        if a.captioner == "llava":
            if not a.llava_checkpoint:
                p.error("--captioner llava needs --llava-checkpoint")
            from data_prep.idmr.captions import llava_generate

            generate, name = llava_generate(a.llava_checkpoint)
            captioner = MllmCaptioner(generate, name)
        synthesize(loaded, a.out, options=options, scorer=scorer, captioner=captioner, workers=a.workers)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Call through the package module, not __main__: spawned workers then unpickle `data_prep.idmr_synth._produce`.
    from data_prep import idmr_synth

    sys.exit(idmr_synth.main())
