"""IDMR cross-domain data synthesis: detection annotations -> (instance crop, location caption, full image)
triplets as ArrayRecord shards, with a manifest and a report of every instance not turned into a triplet.

`synthesize` does the work (options: `SynthOptions`); its CLI, whose flags name the options below, is

    python -m data_prep.idmr_synth --annotations instances_train2017.json --images train2017/ --out OUT \\
        [--min-side 32] [--min-area-ratio 0.01] [--max-area-ratio 0.8] [--context-pad 0.0] \\
        [--clip-checkpoint CLIP_DIR --clip-threshold 0.2] [--captioner template|llava --llava-checkpoint DIR] \\
        [--val-fraction 0.05 --split-by image|instance|category] [--seed 0] [--max-side 0] [--workers 4] \\
        [--strict] [--max-image-bytes 67108864] [--follow-external-symlinks] [--overwrite]
    python -m data_prep.idmr_synth --tfds-name coco/2017 --tfds-data-dir DIR --split train --out OUT ...
    python -m data_prep.idmr_synth --demo-root ~/.cache/idmr_jax/demo [--demo-split val] --out OUT ...

The recipe (IDMR, arXiv 2504.00954; REFERENCE.md section 4): crop every detection instance by its box, keep crops
that pass the size / area-ratio filters and, optionally, whose CLIP score with "a photo of a {category}" exceeds
the threshold (paper: 0.2), caption the *full* image with the instance's location and surroundings (not the
object itself), and store (crop, caption, full image). Inputs and their formats:
`idmr_jax.tasks.idmr.synth.sources`.

Per instance, the first failing check decides its fate: bad record (see sources) -> unusable image (missing, refused
by the read rules, undecodable, size differs from the annotation) -> ``crowd`` -> box outside the image
(``box_outside``; boxes partly outside are clipped and counted) -> ``too_small`` -> ``area_ratio_low`` /
``area_ratio_high`` -> ``clip_score_low`` -> ``empty_caption``. Bad input (records, images, boxes outside) is
itemised in the report with file, record index and field (``--strict`` makes it an error); filtered instances are
listed by annotation id per reason. Every source annotation is accounted for: ``counts.instances.total == kept +
sum(skipped)``.

Image files are read under `idmr_jax.data.image_files.ReadRules` (``SynthOptions.read_rules``): in a local image
folder every path is resolved and must lie inside the resolved folder (``outside_root``), only regular files are
read (``not_regular_file``: a FIFO or device is never opened) and a file may hold at most ``--max-image-bytes``
(``image_too_large``). With ``--follow-external-symlinks`` links leaving the folder are followed and listed in the
manifest (``external_links``, counted in ``counts.external_links``).

Output in ``--out`` (local folder, one synthesis per folder; an existing ``manifest.json`` this tool did not write
is never replaced without ``--overwrite``):

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
(`idmr_jax.data.shards`); image probes, CLIP scores and MLLM captions are cached in the output folder.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

from idmr_jax.data import image_files
from idmr_jax.data.shards import (
    WRITER_OPTIONS,
    ConversionError,
    check_manifest_owner,
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
from idmr_jax.tasks.idmr.synth import geometry, planning
from idmr_jax.tasks.idmr.synth.captions import TemplateCaptioner
from idmr_jax.tasks.idmr.synth.clip_filter import DEFAULT_THRESHOLD, PROMPT, Scorer
from idmr_jax.tasks.idmr.synth.planning import FILTER_CODES, TOOL_VERSION, assign_splits
from idmr_jax.tasks.idmr.synth.sources import IMAGE, INSTANCE, Loaded, demo_coco, load_coco, load_demo, load_tfds

MANIFEST, REPORT = "manifest.json", "report.json"
# The tool is named after its CLI (as before it moved into the library), so existing outputs resume.
TOOL_NAME = "data_prep.idmr_synth"
SPLIT_MODES = ("image", "instance", "category")
RECORDS_PER_SHARD = 1000
# The demo benchmark's pasted instances are small in small images: keep every one of them.
DEMO_FILTERS = geometry.FilterSpec(min_side=8, min_area_ratio=0.0, max_area_ratio=1.0)

__all__ = ["DEMO_FILTERS", "FILTER_CODES", "TOOL_VERSION", "ConversionError", "SynthOptions", "SynthResult",
           "assign_splits", "demo_coco", "load_coco", "load_demo", "load_tfds", "synthesize"]


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
    read_rules: image_files.ReadRules = image_files.ReadRules()  # which image files may be read (module docstring)

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
        return image_files.encode_jpeg(im.convert("RGB").resize(new, Image.Resampling.LANCZOS)), new
    if im.format in ("JPEG", "MPO") and im.mode in ("RGB", "L"):
        return data, (w, h)
    return image_files.encode_jpeg(im), (w, h)


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded triplets of one shard, in plan order."""
    reader, max_side, rules = task["reader"], task["max_side"], task["read_rules"]
    ref = stored = im = None
    for it in task["items"]:
        if it["ref"] != ref:
            ref = it["ref"]
            try:
                data = reader.read(ref, rules)
            except image_files.ImageFileRefused as e:
                raise ConversionError(f"{it['file_name']}: changed since it was checked: {e}") from e
            if len(data) != it["file_size"]:
                raise ConversionError(f"{it['file_name']}: changed since it was checked "
                                      f"({len(data)} != {it['file_size']} bytes)")
            im = planning.decode_image(data)
            stored, size = _stored_image(data, im, max_side)
        orig = (it["width"], it["height"])
        crop = image_files.encode_jpeg(im.crop(tuple(it["rect"])))
        yield triplets.encode(triplets.TripletRecord(
            crop_jpeg=crop, image_jpeg=stored, caption=it["caption"], category=it["category"],
            instance_id=it["instance_id"], annotation_id=it["annotation_id"], image_id=it["image_id"],
            box=image_files.scale_box(tuple(it["box"]), orig, size),
            crop_box=image_files.scale_box(tuple(it["rect"]), orig, size),
            image_size=size, source=it["source"], captioner=it["captioner"], clip_score=it["clip_score"],
            source_index=it["source_index"]))


# --- the synthesis ----------------------------------------------------------------------------------------------


def synthesize(loaded: Loaded, out: str | os.PathLike, *, options: SynthOptions = SynthOptions(),
               scorer: Scorer | None = None, captioner: Any = None, workers: int = 1,
               overwrite: bool = False) -> SynthResult:
    """Synthesises triplets from a loaded source (`load_coco`, `load_tfds`, `load_demo`)
    into ``out``; see the module docstring. ``scorer`` enables the CLIP filter; ``captioner`` defaults to
    `TemplateCaptioner(options.seed)`. Raises `ConversionError` on a ``manifest.json`` in ``out`` this tool did
    not write (unless ``overwrite``), and under ``options.strict`` on any bad input (the message lists each entry
    by file, record and field)."""
    captioner = captioner or TemplateCaptioner(options.seed)
    rules = options.read_rules
    out = os.path.abspath(os.fspath(out))
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    os.makedirs(out, exist_ok=True)
    try:
        state = ShardState(out, {"tool": TOOL_NAME, "source": loaded.name})
    except RuntimeError as e:
        raise ConversionError(str(e)) from e
    entries = loaded.entries
    beyond = 0  # annotations of images past --limit-images: counted, not listed (they are most of a quick run)
    if options.limit_images is not None:
        entries, rest = entries[: options.limit_images], entries[options.limit_images :]
        beyond = sum(len(e.annotations) for e in rest)

    with process_pool(workers) as pool:
        external = planning.probe_all(loaded, entries, out, pool, workers, rules)
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
            planning.score(cands, loaded, scorer, out, rules=rules)
            scores = [c["clip_score"] for c in cands]
            low = [c for c in cands if not c["clip_score"] > options.clip_threshold]  # paper: keep score > 0.2
            filtered["clip_score_low"] = [c["annotation_id"] for c in low]
            cands = [c for c in cands if c["clip_score"] > options.clip_threshold]
        planning.caption(cands, loaded, captioner, out, rules=rules)
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
                # The read rules decide which files were planned (so the items), not a shard's bytes: not digested.
                task = {"reader": loaded.reader, "items": its[start:stop], "max_side": options.max_side,
                        "read_rules": rules}
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
        "external_links": len(external),
    }
    if len(items) + sum(skipped.values()) != total:  # every annotation must be accounted for exactly once
        raise AssertionError(f"instance accounting broken: {len(items)} kept + {dict(skipped)} != {total}")
    args = {"filters": dataclasses.asdict(options.filters), "clip_threshold": options.clip_threshold,
            "scorer": None if scorer is None else scorer.name, "captioner": captioner.name, "seed": options.seed,
            "val_fraction": options.val_fraction, "split_by": options.split_by, "max_side": options.max_side,
            "records_per_shard": options.records_per_shard, "limit_images": options.limit_images,
            "strict": options.strict, "max_image_bytes": rules.max_bytes,
            "follow_external_symlinks": rules.follow_external_symlinks}
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema": {"module": "idmr_jax.tasks.idmr.records", "version": triplets.SCHEMA_VERSION},
        "writer_options": WRITER_OPTIONS,
        "source": {**loaded.describe, "name": loaded.name, **_annotation_digest(loaded)},
        "args": args,
        "counts": counts,
        "shards": {s: [by_file[p.file] for p in ps] for s, ps in plans.items()},
        "report": REPORT,
        "external_links": external,
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
