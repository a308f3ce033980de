"""Reading one variant/split of the released OACIRR layout, with every check that decides what is converted.

`plan_conversion` reads the three annotation files of a variant's annotation root (REFERENCE.md section 3),
decodes every image once (cached in ``.probe_cache.json`` by file size and mtime) and returns what to write: the
valid gallery images (sorted by name), the valid quadruples (in caption-file order) and a `Skip` for every input
entry not converted as is (the table of problems is in `idmr_jax.tasks.oacir.release`). Image files are checked
against the read rules (`idmr_jax.data.image_files.check_image_file`: inside the dataset root, regular files, size
limit) before any is opened. Nothing is written but the probe cache; `idmr_jax.tasks.oacir.release.convert`
writes the shards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
import re
from collections import Counter
from typing import Any

from idmr_jax.data import image_files
from idmr_jax.data.shards import ConversionError, Skip, file_sha256, map_parallel, write_json_atomic

TOOL_VERSION = "1.0.0"
SPLITS = ("train", "val")
SUBSETS = ("fashion", "car", "product", "landmark")
# Variant -> (image root, annotation root) under the dataset root, as the official loader maps them.
VARIANTS: dict[str, tuple[str, str]] = {"Union": ("OACIRR-Union", "OACIRR-Union/oacirr-union")}
for _name in ("Fashion", "Car", "Product", "Landmark"):
    VARIANTS[_name] = (f"OACIRR-Subset/OACIRR-{_name}", f"OACIRR-Subset/OACIRR-{_name}/oacirr-{_name.lower()}")
    _wo = f"OACIRR-CrossDomain/WO-{_name}"
    VARIANTS[f"WO_{_name}"] = (_wo, f"{_wo}/oacirr-wo-{_name.lower()}")
# The real-photo demo benchmark (`idmr_jax.data.demo_bench`) is laid out like a released subset.
VARIANTS["Demo"] = ("OACIRR-Subset/OACIRR-Demo", "OACIRR-Subset/OACIRR-Demo/oacirr-demo")
VARIANTS["DemoContext"] = ("OACIRR-Subset/OACIRR-DemoContext", "OACIRR-Subset/OACIRR-DemoContext/oacirr-democontext")

BOX_TOLERANCE_PX = 1.0
PROBE_CACHE = ".probe_cache.json"


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
    """The domain of an image: fixed for a subset variant (one under ``OACIRR-Subset/``), else read off a folder
    named after a domain."""
    if VARIANTS[variant][0].startswith("OACIRR-Subset/"):
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
class ConversionPlan:
    """What `plan_conversion` decided: the worker items to write, every skipped entry, counts and sources."""

    gallery: list[dict]  # worker items, sorted by name
    queries: list[dict]  # worker items, caption-file order
    skips: list[Skip]
    counts: dict[str, Any]
    sources: dict[str, Any]
    external_links: list[dict]  # {"file", "target"}: images followed outside the root (follow_external_symlinks)


def _probe_chunk(args: tuple[list[str], str, image_files.ReadRules]) -> list[dict]:
    """Worker entry point: probe a batch of image files (under the read rules)."""
    paths, root, rules = args
    return [image_files.probe_image(p, root, rules) for p in paths]


def _probe_all(img_root: str, rels: list[str], out: str, pool: Any, workers: int, root: str,
               rules: image_files.ReadRules) -> dict[str, dict]:
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
        probed = map_parallel(_probe_chunk, [([os.path.join(img_root, r) for r in c], root, rules) for c in chunks],
                              pool)
        for chunk, res in zip(chunks, probed):
            results.update(zip(chunk, res))
    entries = {rel: r for rel, r in results.items() if r["size"] is not None}
    if entries != cache:
        write_json_atomic(cache_path, {"image_root": img_root, "tool_version": TOOL_VERSION, "entries": entries})
    return results


def plan_conversion(root: str, variant: str, split: str, out: str, pool: Any, workers: int,
                    rules: image_files.ReadRules = image_files.ReadRules()) -> ConversionPlan:
    """Reads and checks ``variant``/``split`` under ``root`` (images decoded over ``pool``, probe cache in ``out``;
    image files read under ``rules``, with ``root`` as the dataset root).

    Raises `ConversionError` when an annotation file is missing, not JSON, or of the wrong top-level type."""
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
    # The read rules, applied to every path before any file is opened (cheap: realpath + stat).
    refused: dict[str, dict] = {}
    external: dict[str, str] = {}  # rel -> resolved target, for links followed outside the root
    for rel in sorted({rel for rel, _ in candidates.values()}):
        try:
            checked = image_files.check_image_file(os.path.join(img_root, rel), root, rules)
        except image_files.ImageFileRefused as e:
            refused[rel] = {"size": None, "error": str(e), "code": e.code}
            continue
        if checked.external:
            external[rel] = checked.path
    probes = _probe_all(img_root, sorted({rel for rel, _ in candidates.values()} - set(refused)), out, pool,
                        workers, root, rules)
    probes.update(refused)
    usable: dict[str, dict] = {}
    for name, (rel, instance) in candidates.items():
        p = probes[rel]
        if p["error"] is not None:
            # Probes cached by an older version carry no code: a size means the file was read.
            code = p.get("code") or ("missing_image" if p["size"] is None else "undecodable_image")
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
        "external_links": len(external),
    }
    sources = {"root": root, "image_root": img_dir, "annotation_root": anno_dir,
               "files": {f: file_sha256(os.path.join(root, f)) for f in (f_caps, f_split, f_boxes)}}
    skips.sort(key=lambda s: (s.file, -1 if s.index is None else s.index, s.field))
    links = [{"file": posixpath.join(img_dir, rel), "target": target} for rel, target in sorted(external.items())]
    return ConversionPlan(gallery, queries, skips, counts, sources, links)
