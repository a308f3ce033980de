"""A CIR benchmark release -> ArrayRecord shards of image and query records, with a manifest.

    python -m data_prep.cir --benchmark cirr --root /data/CIRR --split val --out /data/ar/cirr-val [--strict]

The benchmark module (`idmr_jax.tasks.cir.benchmarks`) reads the annotation files and names every image file;
this module checks and reads the files (under `idmr_jax.data.image_files.ReadRules`: inside ``--root``, regular,
at most ``--max-image-bytes``, fully decodable), drops what cannot be used, and writes, into ``--out``:

- ``images-IIIII-of-NNNNN.array_record``: one image record per usable image, in the release's order (a query's
  ``reference_index`` is a key into these shards read in order);
- ``queries-IIIII-of-MMMMM.array_record``: one query record per usable query, in annotation-file order;
- ``manifest.json``: the same conventions as ``data_prep.oacirr``: counts, per-shard records and sha256, the
  annotation files read with their sha256, the arguments, the tool version, and ``skipped``: every input entry not
  converted, with its file, record, field, code and reason. No timestamps: equal inputs give an equal manifest.

Bad input found here (the readers' own skips come first in ``skipped``):

| problem                                        | code                           | action        |
|------------------------------------------------|--------------------------------|---------------|
| image file missing                             | missing_image                  | image skipped |
| image file refused by the read rules           | outside_root, not_regular_file, image_too_large | image skipped |
| image file that does not decode                | undecodable_image              | image skipped |
| a crop outside its photo                       | crop_outside                   | image skipped |
| a query naming a skipped image (reference, target, candidate or img_set member) | unusable_image | query skipped |

``--strict`` turns any skip (the reader's or these) into a `ConversionError` listing each one by file, record and
field. Finished shards are reused when rerun on the same inputs (`idmr_jax.data.shards`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Iterator

from PIL import Image as PILImage

from idmr_jax.data import image_files
from idmr_jax.data.shards import (WRITER_OPTIONS, ConversionError, ShardPlan, Skip, check_manifest_owner,
                                  json_digest, open_shard_state, probe_image_files, process_pool, report_skips,
                                  shard_name, split_contiguous, write_json_atomic, write_shards)
from idmr_jax.tasks.cir import benchmarks, records
from idmr_jax.tasks.cir.benchmarks.base import Image, Query, Release

TOOL_NAME = "data_prep.cir"
TOOL_VERSION = 1
MANIFEST = "manifest.json"
RECORDS_PER_SHARD = 1000

__all__ = ["MANIFEST", "TOOL_NAME", "ConversionError", "convert", "crop_to_square", "usable_release"]


def crop_to_square(data: bytes, crop: tuple[float, float, float, float]) -> tuple[bytes, tuple[float, ...]]:
    """The region `crop` (source pixels) clamped to the photo, cut out and padded to a black square (centred), as
    the GeneCIS loader does (``datasets/vaw_dataset.py``: ``min(W, right)``, ``min(H, bottom)``, then PIL's crop,
    which rounds each coordinate, then ``expand2square``); -> (PNG bytes, the region cut, in whole pixels)."""
    with PILImage.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        x1, y1 = round(max(0.0, crop[0])), round(max(0.0, crop[1]))
        x2, y2 = round(min(w, crop[2])), round(min(h, crop[3]))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"crop {list(crop)} lies outside the {w}x{h} image")
        region = im.crop((x1, y1, x2, y2))
    side = max(region.size)
    square = PILImage.new("RGB", (side, side))
    square.paste(region, ((side - region.width) // 2, (side - region.height) // 2))
    buf = io.BytesIO()
    square.save(buf, format="PNG")
    return buf.getvalue(), (float(x1), float(y1), float(x2), float(y2))


def usable_release(release: Release, root: str, rules: image_files.ReadRules, pool=None) -> tuple[
        list[Image], list[Query], list[Skip], dict[str, dict]]:
    """The release's images whose files pass the read rules and decode, and the queries all of whose images are
    usable; -> (images, queries, skips of this step, probe results by key)."""
    paths = [img.path if os.path.isabs(img.path) else os.path.join(root, img.path) for img in release.images]
    probes = probe_image_files(paths, root, rules, pool)
    images, skips, probed = [], [], {}
    for index, (img, path, probe) in enumerate(zip(release.images, paths, probes)):
        rel = os.path.relpath(path, root)
        if probe["error"] is not None:
            skips.append(Skip(rel, index, img.key, "image", probe["code"], probe["error"], "record_skipped"))
            continue
        if img.crop is not None and (img.crop[0] >= probe["width"] or img.crop[1] >= probe["height"]
                                     or img.crop[2] <= 0 or img.crop[3] <= 0):
            skips.append(Skip(rel, index, img.key, "crop", "crop_outside",
                              f"crop {list(img.crop)} outside the {probe['width']}x{probe['height']} image",
                              "record_skipped"))
            continue
        images.append(dataclasses.replace(img, path=path))
        probed[img.key] = probe
    usable = {img.key for img in images}
    queries = []
    for q in release.queries:
        named = [("reference", q.reference)] + [(f"targets[{i}]", k) for i, k in enumerate(q.targets)]
        named += [(f"candidates[{i}]", k) for i, k in enumerate(q.candidates or ())]
        named += [(f"subset[{i}]", k) for i, k in enumerate(q.subset)]
        bad = [(field, key) for field, key in named if key not in usable]
        if bad:
            field, key = bad[0]
            skips.append(Skip(q.source or release.benchmark, q.source_index, q.query_id, field,
                              "unusable_image", f"image {key!r} was skipped (see its own entry)", "record_skipped"))
            continue
        queries.append(q)
    return images, queries, skips, probed


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded records of one shard."""
    read = task["read"]
    for item in task["items"]:
        if task["kind"] == records.QUERY_KIND:
            yield records.encode_query(records.QueryRecord(**item))
            continue
        try:
            data, _ = image_files.read_image_file(item["path"], read["root"], read["rules"])
        except image_files.ImageFileRefused as e:
            raise ConversionError(f"{item['path']}: changed since it was checked: {e}") from e
        crop, size = None, (item["width"], item["height"])
        if item["crop"] is not None:
            data, crop = crop_to_square(data, item["crop"])
            side = int(max(crop[2] - crop[0], crop[3] - crop[1]))
            size = (side, side)
        yield records.encode_image(records.ImageRecord(
            image=data, key=item["key"], image_id=item["image_id"], group=item["group"], crop=crop, image_size=size,
            benchmark=task["benchmark"], split=task["split"]))


def _query_items(queries: list[Query], index_of: dict[str, int], benchmark: str, split: str) -> list[dict]:
    return [dict(query_id=q.query_id, text=q.text, reference=q.reference, reference_index=index_of[q.reference],
                 targets=tuple(q.targets), group=q.group,
                 candidates=None if q.candidates is None else tuple(q.candidates), subset=tuple(q.subset),
                 extra=json.dumps(dict(q.extra), sort_keys=True), source_index=q.source_index,
                 benchmark=benchmark, split=split) for q in queries]


def _plans(prefix: str, kind: str, items: list[dict], num: int, meta: dict, read: dict) -> list[ShardPlan]:
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"kind": kind, "items": items[start:stop], **meta}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              **task})
        plans.append(ShardPlan(shard_name(prefix, i, num), digest, {**task, "read": read}))
    return plans


def convert(benchmark: str, root: str, split: str, out: str, *, strict: bool = False, workers: int = 1,
            max_image_bytes: int = image_files.DEFAULT_MAX_IMAGE_BYTES, follow_external_symlinks: bool = False,
            overwrite: bool = False) -> dict:
    """Converts one benchmark split (see the module docstring); returns the manifest written."""
    module = benchmarks.get(benchmark)
    if split not in module.SPLITS:
        raise ConversionError(f"{benchmark} has no split {split!r}; choose from {module.SPLITS}")
    root, out = os.path.abspath(root), os.path.abspath(out)
    rules = image_files.ReadRules(max_image_bytes, follow_external_symlinks)
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    release = module.read_release(root, split)
    with process_pool(workers) as pool:
        images, queries, own_skips, probed = usable_release(release, root, rules, pool)
        skips = list(release.skips) + own_skips
        report_skips(skips, strict=strict)
        os.makedirs(out, exist_ok=True)
        state = open_shard_state(out, {"tool": TOOL_NAME, "benchmark": benchmark, "split": split})
        image_items = [dict(key=img.key, image_id=img.image_id, group=img.group, path=img.path,
                            crop=None if img.crop is None else list(img.crop), size=probed[img.key]["size"],
                            mtime_ns=probed[img.key]["mtime_ns"], width=probed[img.key]["width"],
                            height=probed[img.key]["height"]) for img in images]
        index_of = {img.key: i for i, img in enumerate(images)}
        query_items = _query_items(queries, index_of, benchmark, split)
        meta, read = {"benchmark": benchmark, "split": split}, {"root": root, "rules": rules}
        n_img = max(1, math.ceil(len(image_items) / RECORDS_PER_SHARD))
        n_q = max(1, math.ceil(len(query_items) / RECORDS_PER_SHARD))
        i_plans = _plans("images", records.IMAGE_KIND, image_items, n_img, meta, read)
        q_plans = _plans("queries", records.QUERY_KIND, query_items, n_q, meta, read)
        infos, written, reused = write_shards(out, i_plans + q_plans, _produce, state, pool=pool)
    by_file = {i.file: dataclasses.asdict(i) for i in infos}
    counts = dict(release.counts, images=len(images), queries=len(queries), skipped=len(skips),
                  labelled_queries=sum(1 for q in queries if q.targets))
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "dataset": benchmark,
        "split": split,
        "args": {"benchmark": benchmark, "root": root, "split": split, "strict": strict,
                 "max_image_bytes": max_image_bytes, "follow_external_symlinks": follow_external_symlinks},
        "sources": release.sources,
        "counts": counts,
        "shards": {"images": [by_file[p.file] for p in i_plans], "queries": [by_file[p.file] for p in q_plans]},
        "skipped": [dataclasses.asdict(s) for s in skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("%s/%s: %d queries, %d images, %d skipped; wrote %d shards, reused %d", benchmark, split,
                 len(queries), len(images), len(skips), len(written), len(reused))
    return manifest
