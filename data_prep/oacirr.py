"""OACIRR (released layout) -> ArrayRecord shards of query and gallery records, with a manifest.

    python -m data_prep.oacirr --root /data/OACIRR --variant Fashion --split val --out /data/ar/fashion-val \
        [--num-shards 8] [--gallery-shards 4] [--max-side 512] [--workers 8] [--strict]

Reads, under ``--root`` (REFERENCE.md section 3), the variant's annotation root:
``quadruple_captions/caption_full.<split>.json``, ``image_splits/split.<split>.json`` (image name -> path relative
to the image root; its parent folder is the instance id) and ``image_bounding_box/bounding_box.<split>.json``.
Writes into ``--out`` (one folder per variant and split):

- ``queries-IIIII-of-NNNNN.array_record``: one query record per valid quadruple, in caption-file order;
- ``gallery-IIIII-of-MMMMM.array_record``: one gallery record per valid image of the split map, sorted by name;
  a query's ``reference_gallery_index`` / ``target_gallery_index`` are keys into these shards read in order;
- ``manifest.json``: counts, instance counts, per-shard records/sha256, source files with their sha256, the
  arguments, the tool version and ``skipped``: every input entry not converted as is (file, index, name,
  field, code, reason, action). The manifest holds no timestamps: equal inputs give an equal manifest.

Record schema: `idmr_jax.data.records`. Images are stored as their original file bytes; with ``--max-side`` an
image whose longer side exceeds it is resized (Lanczos) and re-encoded (JPEG q95 for JPEG sources, else PNG) and
its boxes are rescaled to the stored pixels. Every image is fully decoded once here to catch broken files.

Bad input (each found before anything is written; ``--strict`` turns any of them into an error):

| problem                                   | code                     | action                              |
|-------------------------------------------|--------------------------|-------------------------------------|
| image missing / does not decode           | missing/undecodable_image| gallery record skipped              |
| path with a '..' part or absolute         | unsafe_path              | gallery record skipped              |
| path without an instance folder           | no_instance              | gallery record skipped              |
| name repeated in a JSON map               | duplicate_name           | later entries skipped (first kept)  |
| query naming an image not in the split map| unknown_name             | query skipped                       |
| query naming a skipped image              | unusable_image           | query skipped                       |
| empty modification text / category        | empty_text               | query skipped                       |
| box non-finite / zero-area / outside      | box_nonfinite/empty/outside | query skipped; gallery box dropped |
| missing or mistyped field                 | missing_field / bad_type | query skipped                       |

Boxes may exceed the image by up to `BOX_TOLERANCE_PX` (annotation rounding); they are then clipped to it and
counted in ``counts.boxes_clipped``. A missing or null box is kept as "no box" and counted, not skipped.

Resuming: finished shards are listed, with the digest of their inputs and their sha256, in ``.convert_state.json``;
a rerun rewrites only shards whose file is missing or altered or whose inputs changed (see `data_prep.shards`).
Image decode results are cached in ``.probe_cache.json`` (keyed by file size and mtime). One converter per folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import posixpath
import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from data_prep import images
from data_prep.shards import (
    WRITER_OPTIONS,
    ShardPlan,
    ShardState,
    file_sha256,
    json_digest,
    map_parallel,
    process_pool,
    shard_name,
    split_contiguous,
    write_json_atomic,
    write_shards,
)
from idmr_jax.data import records

TOOL_VERSION = "1.0.0"
SPLITS = ("train", "val")
SUBSETS = ("fashion", "car", "product", "landmark")
# Variant -> (image root, annotation root) under the dataset root, as the official loader maps them.
VARIANTS: dict[str, tuple[str, str]] = {"Union": ("OACIRR-Union", "OACIRR-Union/oacirr-union")}
for _name in ("Fashion", "Car", "Product", "Landmark"):
    VARIANTS[_name] = (f"OACIRR-Subset/OACIRR-{_name}", f"OACIRR-Subset/OACIRR-{_name}/oacirr-{_name.lower()}")
    _wo = f"OACIRR-CrossDomain/WO-{_name}"
    VARIANTS[f"WO_{_name}"] = (_wo, f"{_wo}/oacirr-wo-{_name.lower()}")
# The real-photo demo benchmark (data_prep.demo_bench) is laid out like a released subset.
VARIANTS["Demo"] = ("OACIRR-Subset/OACIRR-Demo", "OACIRR-Subset/OACIRR-Demo/oacirr-demo")

BOX_TOLERANCE_PX = 1.0
RECORDS_PER_SHARD = 1000  # default shard size: ~100-300 MB of images per shard at OACIRR's image sizes
MANIFEST = "manifest.json"
PROBE_CACHE = ".probe_cache.json"


class ConversionError(RuntimeError):
    """The input cannot be converted (broken layout, or any bad entry under --strict)."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """One input entry not converted as is. ``index`` is the entry's position in ``file`` (list index or the
    position of the key in a JSON object); ``action`` says what happened to it."""

    file: str
    index: int | None
    name: str | None
    field: str
    code: str
    reason: str
    action: str  # "record_skipped" | "box_dropped" | "entry_ignored"

    def describe(self) -> str:
        """One line naming the file, the record and the field."""
        return f"{self.file}: record {self.index} ({self.name!r}), field '{self.field}': {self.reason} [{self.code}]"


# --- JSON loading that keeps what json.load would hide: repeated keys ---------------------------------------


class _Obj(dict):
    """A JSON object that remembers its key positions and its repeated keys (the first occurrence wins)."""

    positions: dict[str, int]
    duplicates: list[tuple[int, str, Any]]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    obj.positions, obj.duplicates = {}, []
    for pos, (key, value) in enumerate(pairs):
        if key in obj:
            obj.duplicates.append((pos, key, value))
        else:
            obj[key] = value
            obj.positions[key] = pos
    return obj


def _load_json(root: str, rel: str) -> Any:
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise ConversionError(f"{rel}: missing under {root} (expected the released OACIRR layout, REFERENCE.md §3)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_pairs_hook)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{rel}: not valid JSON: {e}") from e


# --- field checks --------------------------------------------------------------------------------------------


def _unsafe_path(rel: str) -> bool:
    """True for paths that could leave the image root: absolute, drive-qualified, or with any '..' part."""
    norm = rel.replace("\\", "/")
    return norm.startswith("/") or bool(re.match(r"^[A-Za-z]:", norm)) or ".." in norm.split("/")


def _derive_subset(rel: str, variant: str) -> str:
    """The domain of an image: fixed for a subset variant, else read off a folder named after a domain."""
    if variant in ("Fashion", "Car", "Product", "Landmark", "Demo"):
        return variant.lower()
    for part in posixpath.dirname(rel.replace("\\", "/")).split("/"):
        p = part.lower().removeprefix("oacirr-").removeprefix("oacirr_")
        if p in SUBSETS:
            return p
    return variant.lower()


def _check_box(value: Any, width: int, height: int) -> tuple[tuple[float, ...] | None, str | None, str, bool]:
    """-> (box clipped to the image, error code or None, reason, clipped?)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None, "box_malformed", f"expected [x1, y1, x2, y2], got {value!r}", False
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in value):
        return None, "box_malformed", f"box values must be numbers, got {value!r}", False
    x1, y1, x2, y2 = (float(c) for c in value)
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
        return None, "box_nonfinite", f"box has non-finite values {value!r}", False
    if not (x2 > x1 and y2 > y1):
        return None, "box_empty", f"box has zero or negative area {value!r}", False
    t = BOX_TOLERANCE_PX
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        return None, "box_outside", f"box {value!r} outside the {width}x{height} image", False
    box = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if not (box[2] > box[0] and box[3] > box[1]):
        return None, "box_outside", f"box {value!r} outside the {width}x{height} image", False
    return box, None, "", box != (x1, y1, x2, y2)


def _check_text(entry: dict, key: str) -> tuple[str | None, str]:
    """-> (error code or None, reason) for a required non-empty string field."""
    if key not in entry:
        return "missing_field", f"field '{key}' missing"
    if not isinstance(entry[key], str):
        return "bad_type", f"expected a string, got {type(entry[key]).__name__}"
    if not entry[key].strip():
        return "empty_text", "empty text"
    return None, ""


# --- planning: every check that decides what is written, before anything is written --------------------------


@dataclasses.dataclass
class _Plan:
    gallery: list[dict]  # worker items, sorted by name
    queries: list[dict]  # worker items, caption-file order
    skips: list[Skip]
    counts: dict[str, Any]
    sources: dict[str, Any]


def _probe_chunk(paths: list[str]) -> list[dict]:
    """Worker entry point: probe a batch of image files."""
    return [images.probe_image(p) for p in paths]


def _probe_all(img_root: str, rels: list[str], out: str, pool: Any, workers: int) -> dict[str, dict]:
    """Decodes every image once (in parallel), reusing cached results for files with the same size and mtime."""
    cache_path = os.path.join(out, PROBE_CACHE)
    cache: dict[str, dict] = {}
    if os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("image_root") == img_root and saved.get("tool_version") == TOOL_VERSION:
            cache = saved.get("entries", {})
    results: dict[str, dict] = {}
    todo = []
    for rel in rels:
        hit = cache.get(rel)
        try:
            st = os.stat(os.path.join(img_root, rel))
        except OSError:
            st = None
        if hit is not None and st is not None and (hit["size"], hit["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            results[rel] = hit
        else:
            todo.append(rel)
    if todo:
        logging.info("decoding %d images (%d cached)", len(todo), len(results))
        step = max(1, min(256, math.ceil(len(todo) / max(1, 4 * workers))))
        chunks = [todo[i : i + step] for i in range(0, len(todo), step)]
        probed = map_parallel(_probe_chunk, [[os.path.join(img_root, r) for r in c] for c in chunks], pool)
        for chunk, res in zip(chunks, probed):
            results.update(zip(chunk, res))
    entries = {rel: r for rel, r in results.items() if r["size"] is not None}
    if entries != cache:
        write_json_atomic(cache_path, {"image_root": img_root, "tool_version": TOOL_VERSION, "entries": entries})
    return results


def _plan(root: str, variant: str, split: str, out: str, pool: Any, workers: int) -> _Plan:
    img_dir, anno_dir = VARIANTS[variant]
    img_root = os.path.join(root, img_dir)
    f_caps = posixpath.join(anno_dir, "quadruple_captions", f"caption_full.{split}.json")
    f_split = posixpath.join(anno_dir, "image_splits", f"split.{split}.json")
    f_boxes = posixpath.join(anno_dir, "image_bounding_box", f"bounding_box.{split}.json")
    captions, split_map, box_map = (_load_json(root, f) for f in (f_caps, f_split, f_boxes))
    for rel, obj, want in ((f_caps, captions, list), (f_split, split_map, dict), (f_boxes, box_map, dict)):
        if not isinstance(obj, want):
            raise ConversionError(f"{rel}: expected a JSON {'list' if want is list else 'object'} at the top level")
    skips: list[Skip] = []

    # Gallery: the split map, with its paths checked lexically, then every image decoded.
    bad_image: dict[str, str] = {}  # name -> why its gallery record was skipped (queries naming it cite this)
    for pos, name, value in split_map.duplicates:
        first = split_map[name]
        detail = "same path" if value == first else f"conflicting path {value!r} vs {first!r}"
        skips.append(Skip(f_split, pos, name, "name", "duplicate_name",
                          f"duplicate name in split map ({detail}); first occurrence kept", "record_skipped"))
    candidates: dict[str, tuple[str, str]] = {}  # name -> (rel, instance)
    for name, rel in split_map.items():
        pos = split_map.positions[name]
        code, reason = None, ""
        if not isinstance(rel, str) or not rel.strip():
            code, reason = "bad_type", f"expected a relative image path, got {rel!r}"
        elif _unsafe_path(rel):
            code, reason = "unsafe_path", f"path {rel!r} escapes the image root"
        elif not posixpath.basename(posixpath.dirname(rel.replace("\\", "/"))):
            code, reason = "no_instance", f"path {rel!r} has no instance folder"
        if code:
            skips.append(Skip(f_split, pos, name, "path", code, reason, "record_skipped"))
            bad_image[name] = reason
        else:
            candidates[name] = (rel, posixpath.basename(posixpath.dirname(rel.replace("\\", "/"))))
    probes = _probe_all(img_root, sorted({rel for rel, _ in candidates.values()}), out, pool, workers)
    usable: dict[str, dict] = {}
    for name, (rel, instance) in candidates.items():
        p = probes[rel]
        if p["error"] is not None:
            code = "missing_image" if p["size"] is None else "undecodable_image"
            reason = f"{p['error']} ({posixpath.join(img_dir, rel)})"
            skips.append(Skip(f_split, split_map.positions[name], name, "image", code, reason, "record_skipped"))
            bad_image[name] = reason
            continue
        usable[name] = {"name": name, "rel": rel, "path": os.path.join(img_root, rel), "instance": instance,
                        "subset": _derive_subset(rel, variant), "size": p["size"], "mtime_ns": p["mtime_ns"],
                        "width": p["width"], "height": p["height"], "box": None}

    # Gallery boxes: optional per image; a bad one is dropped (the image itself is fine) and listed.
    clipped = Counter()
    for pos, name, _ in box_map.duplicates:
        skips.append(Skip(f_boxes, pos, name, "name", "duplicate_name",
                          "duplicate name in box map; first occurrence kept", "entry_ignored"))
    for name, value in box_map.items():
        pos = box_map.positions[name]
        if name not in split_map:
            skips.append(Skip(f_boxes, pos, name, "name", "unknown_name", "name not in split map", "entry_ignored"))
        elif name in usable:
            g = usable[name]
            box, code, reason, was_clipped = _check_box(value, g["width"], g["height"])
            if code:
                skips.append(Skip(f_boxes, pos, name, "box", code, reason, "box_dropped"))
            g["box"], clipped["gallery"] = box, clipped["gallery"] + was_clipped
    gallery = [usable[n] for n in sorted(usable)]
    key_of = {g["name"]: i for i, g in enumerate(gallery)}

    # Queries, in file order; the first failing field decides the reason.
    queries: list[dict] = []
    for idx, entry in enumerate(captions):
        def skip(field: str, code: str, reason: str, _idx=idx, _entry=entry) -> None:
            name = _entry.get("reference") if isinstance(_entry, dict) else None
            skips.append(Skip(f_caps, _idx, name if isinstance(name, str) else None, field, code, reason,
                              "record_skipped"))

        if not isinstance(entry, dict):
            skip("(record)", "bad_type", f"expected an object, got {type(entry).__name__}")
            continue
        if entry.duplicates:
            skip(entry.duplicates[0][1], "duplicate_key", "key repeated in the record")
            continue
        failed = False
        for key in ("reference", "target"):
            name = entry.get(key)
            if not isinstance(name, str) or not name:
                skip(key, "missing_field" if key not in entry else "bad_type", f"expected an image name, got {name!r}")
            elif name not in split_map:
                skip(key, "unknown_name", f"name {name!r} not in split map")
            elif name not in usable:
                skip(key, "unusable_image", f"{key} image unusable: {bad_image[name]}")
            else:
                continue
            failed = True
            break
        if failed:
            continue
        for key in ("modification_text_mllm", "object_category"):
            code, reason = _check_text(entry, key)
            if code:
                skip(key, code, reason)
                failed = True
                break
        if failed:
            continue
        ref, tgt = usable[entry["reference"]], usable[entry["target"]]
        box, raw_box = None, entry.get("reference_bounding_box")
        if raw_box is not None:
            box, code, reason, was_clipped = _check_box(raw_box, ref["width"], ref["height"])
            if code:
                skip("reference_bounding_box", code, reason)
                continue
            clipped["queries"] += was_clipped
        group = entry.get("target_subset_vitG")
        if group is not None and not (isinstance(group, list) and all(isinstance(s, str) for s in group)):
            skip("target_subset_vitG", "bad_type", "expected a list of image names")
            continue
        queries.append({"index": idx, "ref": ref, "target_name": tgt["name"], "target_instance": tgt["instance"],
                        "box": box, "category": entry["object_category"], "text": entry["modification_text_mllm"],
                        "group": group, "ref_key": key_of[ref["name"]], "target_key": key_of[tgt["name"]]})

    per_subset: dict[str, dict[str, int]] = {}
    for g in gallery:
        per_subset.setdefault(g["subset"], {"gallery": 0, "queries": 0})["gallery"] += 1
    for q in queries:
        per_subset[q["ref"]["subset"]]["queries"] += 1
    actions = Counter(s.action for s in skips)
    counts = {
        "queries": len(queries),
        "gallery": len(gallery),
        "instances": {"gallery": len({g["instance"] for g in gallery}),
                      "query_references": len({q["ref"]["instance"] for q in queries}),
                      "query_targets": len({q["target_instance"] for q in queries})},
        "per_subset": per_subset,
        "queries_without_box": sum(q["box"] is None for q in queries),
        "gallery_without_box": sum(g["box"] is None for g in gallery),
        "boxes_clipped": {"queries": clipped["queries"], "gallery": clipped["gallery"]},
        "source": {"caption_records": len(captions),
                   "split_map_entries": len(split_map) + len(split_map.duplicates),
                   "box_map_entries": len(box_map) + len(box_map.duplicates)},
        "skipped": {a: actions[a] for a in ("record_skipped", "box_dropped", "entry_ignored")},
    }
    sources = {"root": root, "image_root": img_dir, "annotation_root": anno_dir,
               "files": {f: file_sha256(os.path.join(root, f)) for f in (f_caps, f_split, f_boxes)}}
    return _Plan(gallery, queries, sorted(skips, key=lambda s: (s.file, -1 if s.index is None else s.index, s.field)),
                 counts, sources)


# --- shard production (runs in worker processes) -------------------------------------------------------------


def _load_image(item: dict, max_side: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Reads an image's bytes, re-encoded if it exceeds ``max_side``; -> (bytes, stored (w, h), source (w, h))."""
    with open(item["path"], "rb") as f:
        data = f.read()
    if len(data) != item["size"]:
        raise ConversionError(f"{item['path']}: changed since it was checked ({len(data)} != {item['size']} bytes)")
    orig = (item["width"], item["height"])
    if max_side and max(orig) > max_side:
        return images.shrink_to_max_side(data, max_side)
    return data, orig, orig


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded records of one shard, in plan order."""
    max_side, variant = task["max_side"], task["variant"]
    for item in task["items"]:
        if task["kind"] == records.GALLERY_KIND:
            data, size, orig = _load_image(item, max_side)
            yield records.encode_gallery(records.GalleryRecord(
                image=data, name=item["name"], instance=item["instance"],
                box=images.scale_box(item["box"], orig, size), image_size=size, orig_size=orig,
                subset=item["subset"], variant=variant))
        else:
            ref = item["ref"]
            data, size, orig = _load_image(ref, max_side)
            group = item["group"]
            yield records.encode_query(records.QueryRecord(
                reference_image=data, reference_name=ref["name"], reference_instance=ref["instance"],
                reference_box=images.scale_box(item["box"], orig, size), reference_size=size,
                reference_orig_size=orig, object_category=item["category"], modification_text=item["text"],
                target_name=item["target_name"], target_instance=item["target_instance"], subset=ref["subset"],
                variant=variant, source_index=item["index"], reference_gallery_index=item["ref_key"],
                target_gallery_index=item["target_key"], target_subset_vitG=None if group is None else tuple(group)))


def _shard_plans(prefix: str, kind: str, items: list[dict], num: int, max_side: int, variant: str) -> list[ShardPlan]:
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"kind": kind, "items": items[start:stop], "max_side": max_side, "variant": variant}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              **task})
        plans.append(ShardPlan(shard_name(prefix, i, num), digest, task))
    return plans


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the manifest it wrote, and which shard files it wrote or found finished."""

    manifest: dict
    written: list[str]
    reused: list[str]


def convert(root: str, variant: str, split: str, out: str, *, num_shards: int | None = None,
            gallery_shards: int | None = None, max_side: int = 0, workers: int = 1,
            strict: bool = False) -> ConvertResult:
    """Converts one OACIRR variant/split; see the module docstring. ``None`` shard counts mean
    ceil(records / RECORDS_PER_SHARD). Raises `ConversionError` on a broken layout, and under ``strict`` on any
    entry that would be skipped (the message lists each one by file, record and field)."""
    if variant not in VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if split not in SPLITS:
        raise ConversionError(f"unknown split {split!r}; choose from {SPLITS}")
    for flag, v in (("num_shards", num_shards), ("gallery_shards", gallery_shards)):
        if v is not None and v < 1:
            raise ConversionError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    root, out = os.path.abspath(root), os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    # The root is not part of the identity: a moved dataset changes the shard digests, so shards are redone.
    try:
        state = ShardState(out, {"tool": "data_prep.oacirr", "variant": variant, "split": split})
    except RuntimeError as e:
        raise ConversionError(str(e)) from e

    with process_pool(workers) as pool:
        plan = _plan(root, variant, split, out, pool, workers)
        if strict and plan.skips:
            n = len(plan.skips)
            lines = "\n".join(s.describe() for s in plan.skips)
            raise ConversionError(f"--strict: {n} bad input entr{'y' if n == 1 else 'ies'}:\n{lines}")
        for s in plan.skips:
            logging.warning("skipped: %s", s.describe())
        nq = num_shards or max(1, math.ceil(len(plan.queries) / RECORDS_PER_SHARD))
        ng = gallery_shards or max(1, math.ceil(len(plan.gallery) / RECORDS_PER_SHARD))
        q_plans = _shard_plans("queries", records.QUERY_KIND, plan.queries, nq, max_side, variant)
        g_plans = _shard_plans("gallery", records.GALLERY_KIND, plan.gallery, ng, max_side, variant)
        infos, written, reused = write_shards(out, g_plans + q_plans, _produce, state, pool=pool)
    expected = {p.file for p in q_plans + g_plans}
    for stale in sorted(glob.glob(os.path.join(out, "*.array_record"))):
        if os.path.basename(stale) not in expected:
            logging.warning("%s is not part of this conversion (left in place; read shards via the manifest)", stale)

    def listing(plans: Sequence[ShardPlan]) -> list[dict]:
        by_file = {i.file: i for i in infos}
        return [dataclasses.asdict(by_file[p.file]) for p in plans]

    manifest = {
        "tool": {"name": "data_prep.oacirr", "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "dataset": "OACIRR",
        "variant": variant,
        "split": split,
        # --workers is left out on purpose: it does not change a byte of the output.
        "args": {"root": root, "variant": variant, "split": split, "num_shards": num_shards,
                 "gallery_shards": gallery_shards, "max_side": max_side, "strict": strict},
        "sources": plan.sources,
        "counts": plan.counts,
        "shards": {"queries": listing(q_plans), "gallery": listing(g_plans)},
        "skipped": [dataclasses.asdict(s) for s in plan.skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("%s/%s: %d queries, %d gallery images, %d skipped entries; wrote %d shards, reused %d",
                 variant, split, len(plan.queries), len(plan.gallery), len(plan.skips), len(written), len(reused))
    return ConvertResult(manifest, written, reused)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit status (2 on a conversion error)."""
    p = argparse.ArgumentParser(prog="python -m data_prep.oacirr", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="OACIRR dataset root (holds OACIRR-Union/, OACIRR-Subset/, ...)")
    p.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    p.add_argument("--split", required=True, choices=SPLITS)
    p.add_argument("--out", required=True, help="output folder, one per variant and split")
    p.add_argument("--num-shards", type=int, default=None, help="query shards (default: ~1000 records each)")
    p.add_argument("--gallery-shards", type=int, default=None, help="gallery shards (default: ~1000 records each)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images longer than this (0: keep bytes)")
    p.add_argument("--workers", type=int, default=1, help="processes; one shard is one work unit")
    p.add_argument("--strict", action="store_true", help="fail on any bad entry instead of skipping it")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        convert(a.root, a.variant, a.split, a.out, num_shards=a.num_shards, gallery_shards=a.gallery_shards,
                max_side=a.max_side, workers=a.workers, strict=a.strict)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Call through the package module, not __main__: spawned workers then unpickle `data_prep.oacirr._produce`.
    from data_prep import oacirr

    sys.exit(oacirr.main())
