"""InstructCIR's training data -> ArrayRecord shards of universal training pairs, with a manifest.

    python -m data_prep.instructcir --format {captions,coco,triplets} --src FILE --images DIR --out DIR [--strict]

Three source formats (image paths are relative to ``--images``):

- ``captions`` (stage 1), jsonl: ``{"image": path, "caption": str}`` or ``"captions": [str, ...]``, optional
  ``"id"``. One pair per caption.
- ``coco`` (stage 1), COCO captions JSON (``captions_train2017.json``): ``"images"`` ``[{id, file_name}]`` and
  ``"annotations"`` ``[{image_id, caption, id}]``. One pair per annotation.
- ``triplets`` (stage 2), jsonl: ``{"image": path, "instruction": str, "modified_caption": str,
  "original_caption": str}``, optional ``"id"``. One pair per line.

A caption pair (`records.TrainingPair`) is: query = the image (modality "image", ``id`` = the image's id: the
row's ``"id"``, else its path; COCO: the image id), positive = the caption (modality "text", ``id`` =
``"<image id>:cap<k>"``, k counting that image's captions in file order), no negatives, no instructions. A
triplet pair is: query = the image with the instruction as its text ("image,text", ``id`` = the row's id, else
``"<file>:<line>"``), positive = the modified caption, and one hard negative, the original caption, as the
paper's stage 2 uses it. ``pair_id`` is ``"<file>:<n>"``, n counting the pairs written.

Bad rows are skipped and listed in the manifest (`idmr_jax.data.shards.Skip`: file, line, id, field): a line that
is not a JSON object, a missing or empty field, a repeated id, an image file that is missing, refused by the read
rules (`idmr_jax.data.image_files.ReadRules`) or not decodable. ``strict`` turns any skip into a `ConversionError`
listing them. Output in ``out``: ``train-IIIII-of-NNNNN.array_record`` and ``manifest.json`` (the conventions of
`idmr_jax.tasks.universal.mbeir_convert`: counts, per-shard records and sha256, the source's sha256, the
arguments, ``skipped``; no timestamps). Finished shards are reused when rerun on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from idmr_jax.data import image_files
from idmr_jax.data.shards import (WRITER_OPTIONS, ConversionError, ShardPlan, Skip, check_manifest_owner,
                                  file_sha256, json_digest, open_shard_state, probe_image_files, process_pool,
                                  report_skips, shard_name, split_contiguous, write_json_atomic, write_shards)
from idmr_jax.tasks.universal import records

TOOL_NAME = "data_prep.instructcir"
TOOL_VERSION = 1
MANIFEST = "manifest.json"
RECORDS_PER_SHARD = 1000
FORMATS = ("captions", "coco", "triplets")
TRIPLET_FIELDS = ("instruction", "modified_caption", "original_caption")

__all__ = ["FORMATS", "MANIFEST", "TOOL_NAME", "ConversionError", "PairSpec", "convert_pairs", "read_caption_jsonl",
           "read_coco_captions", "read_triplets"]


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """One pair before its image is read: the query image (path relative to the image folder) and its texts."""

    source_index: int        # line (jsonl) or annotation position (COCO) in the source file
    name: str                # the row's id, used in skips
    query_id: str
    image_path: str
    query_text: str | None   # the instruction of a triplet; None for a caption pair (image-only query)
    positive: tuple[str, str]                  # (id, text)
    negatives: tuple[tuple[str, str], ...]     # (id, text) each
    extra: dict


def _problem(field: str, code: str, reason: str) -> tuple[str, str, str]:
    return field, code, reason


def _text_field(row: dict, field: str) -> tuple[str, str, str] | None:
    """A problem with a required non-empty string field, or None."""
    if field not in row or row[field] is None:
        return _problem(field, "missing_field", f"no '{field}'")
    if not isinstance(row[field], str):
        return _problem(field, "bad_type", f"'{field}' is {type(row[field]).__name__}, expected a string")
    if not row[field].strip():
        return _problem(field, "empty_text", f"'{field}' is empty")
    return None


def _image_path(value: Any) -> str:
    return posixpath.normpath(value.replace("\\", "/"))


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """(line index, parsed object or the JSONDecodeError) of every non-blank line; ConversionError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: unreadable: {e}") from e
    for index, line in enumerate(lines):
        if line.strip():
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                yield index, e


def _jsonl_objects(path: str, skips: list[Skip]) -> Iterator[tuple[int, str | None, dict]]:
    """(line, id or None, row) of every JSON-object line with a usable, unrepeated optional ``id``; the others are
    added to `skips`."""
    file, first = os.path.basename(path), {}
    for index, row in _jsonl_rows(path):
        name = row.get("id") if isinstance(row, dict) else None
        if isinstance(name, int) and not isinstance(name, bool):  # numeric ids, as COCO-style files write them
            name = str(name)
        if isinstance(row, json.JSONDecodeError):
            problem = _problem("", "bad_type", f"not a JSON line: {row}")
        elif not isinstance(row, dict):
            problem = _problem("", "bad_type", f"row is {type(row).__name__}, expected an object")
        elif name is not None and (not isinstance(name, str) or not name.strip()):
            problem, name = _problem("id", "bad_type", f"'id' is {name!r}, expected a string or int"), None
        elif name is not None and name in first:
            problem = _problem("id", "duplicate_id", f"{name!r} already given by line {first[name]}")
        else:
            problem = _text_field(row, "image")
        if isinstance(name, str):
            first.setdefault(name, index)
        if problem:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
        else:
            yield index, name, row


def _caption_pair(file: str, index: int, image_id: str, path: str, k: int, caption: str, extra: dict) -> PairSpec:
    return PairSpec(index, image_id, image_id, path, None, (f"{image_id}:cap{k}", caption), (),
                    {"source": file, "line": index, "image": path, **extra})


def read_caption_jsonl(path: str) -> tuple[list[PairSpec], list[Skip]]:
    """The caption pairs of a jsonl file (module docstring) in file order, and a Skip for each bad row or caption."""
    file, pairs, skips, count = os.path.basename(path), [], [], {}
    for index, name, row in _jsonl_objects(path, skips):
        image = _image_path(row["image"])
        image_id = name or image
        if "captions" in row:
            caps = row["captions"]
            if not isinstance(caps, list) or not caps:
                skips.append(Skip(file, index, name, "captions", "bad_type" if not isinstance(caps, list) else
                                  "empty_text", "'captions' must be a non-empty list of strings", "record_skipped"))
                continue
            fields = [f"captions[{j}]" for j in range(len(caps))]
        else:
            problem = _text_field(row, "caption")
            if problem:
                skips.append(Skip(file, index, name, *problem, "record_skipped"))
                continue
            caps, fields = [row["caption"]], ["caption"]
        for caption, field in zip(caps, fields):
            if not isinstance(caption, str) or not caption.strip():
                skips.append(Skip(file, index, name, field, "empty_text", f"'{field}' is {caption!r}, expected a "
                                  "non-empty string", "entry_ignored"))
                continue
            k = count[image_id] = count.get(image_id, -1) + 1
            pairs.append(_caption_pair(file, index, image_id, image, k, caption, {}))
    return pairs, skips


def _coco_images(file: str, images: list, skips: list[Skip]) -> dict[str, str]:
    """COCO image id (as str) -> file name; bad or repeated entries skipped (field ``images.<key>``)."""
    out = {}
    for index, im in enumerate(images):
        name = str(im.get("id")) if isinstance(im, dict) and isinstance(im.get("id"), (int, str)) else None
        if not isinstance(im, dict):
            problem = _problem("images", "bad_type", f"entry is {type(im).__name__}, expected an object")
        elif name is None or isinstance(im["id"], bool):
            problem = _problem("images.id", "missing_field", f"'id' is {im.get('id')!r}, expected an int or str")
        elif name in out:
            problem = _problem("images.id", "duplicate_id", f"image id {name!r} given twice")
        else:
            problem = _text_field(im, "file_name")
            problem = problem and (f"images.{problem[0]}", *problem[1:])
        if problem:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
        else:
            out[name] = _image_path(im["file_name"])
    return out


def read_coco_captions(path: str) -> tuple[list[PairSpec], list[Skip]]:
    """The caption pairs of a COCO captions JSON (one per annotation, in annotation order) and the skips; a
    ConversionError when the file is not a COCO captions object."""
    file = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ConversionError(f"{path}: expected a COCO captions object with 'images' and 'annotations' lists")
    skips: list[Skip] = []
    images = _coco_images(file, data["images"], skips)
    pairs, seen, count = [], {}, {}
    for index, ann in enumerate(data["annotations"]):
        name = str(ann["id"]) if isinstance(ann, dict) and isinstance(ann.get("id"), (int, str)) else None
        if not isinstance(ann, dict):
            problem = _problem("annotations", "bad_type", f"entry is {type(ann).__name__}, expected an object")
        elif name is not None and name in seen:
            problem = _problem("id", "duplicate_id", f"annotation id {name!r} already at annotation {seen[name]}")
        elif "image_id" not in ann:
            problem = _problem("image_id", "missing_field", "no 'image_id'")
        elif str(ann["image_id"]) not in images:
            problem = _problem("image_id", "unknown_name", f"image {ann['image_id']!r} is not a usable entry of "
                               "'images'")
        else:
            problem = _text_field(ann, "caption")
        if name is not None:
            seen.setdefault(name, index)
        if problem:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
            continue
        image_id = str(ann["image_id"])
        k = count[image_id] = count.get(image_id, -1) + 1
        pairs.append(dataclasses.replace(_caption_pair(file, index, image_id, images[image_id], k, ann["caption"],
                                                       {"annotation_id": name}), name=name or image_id))
    return pairs, skips


def read_triplets(path: str) -> tuple[list[PairSpec], list[Skip]]:
    """The instruction triplets of a jsonl file (module docstring), in file order, and the skips."""
    file, pairs, skips = os.path.basename(path), [], []
    for index, name, row in _jsonl_objects(path, skips):
        problem = next(filter(None, (_text_field(row, f) for f in TRIPLET_FIELDS)), None)
        if problem:
            skips.append(Skip(file, index, name, *problem, "record_skipped"))
            continue
        query_id = name or f"{file}:{index}"
        image = _image_path(row["image"])
        pairs.append(PairSpec(index, query_id, query_id, image, row["instruction"],
                              (f"{query_id}:modified", row["modified_caption"]),
                              ((f"{query_id}:original", row["original_caption"]),),
                              {"source": file, "line": index, "image": image}))
    return pairs, skips


READERS = {"captions": read_caption_jsonl, "coco": read_coco_captions, "triplets": read_triplets}


def _usable_images(pairs: list[PairSpec], images: str, rules: image_files.ReadRules, pool, file: str
                   ) -> tuple[list[PairSpec], dict[str, dict], list[Skip]]:
    """The pairs whose image passes the read rules and decodes (each file probed once) -> (pairs, probes, skips)."""
    paths = list(dict.fromkeys(p.image_path for p in pairs))
    probes = dict(zip(paths, probe_image_files([os.path.join(images, p) for p in paths], images, rules, pool)))
    kept, skips = [], []
    for p in pairs:
        probe = probes[p.image_path]
        if probe["error"] is None:
            kept.append(p)
        else:
            skips.append(Skip(file, p.source_index, p.name, "image", probe["code"], f"{p.image_path}: {probe['error']}",
                              "record_skipped"))
    return kept, probes, skips


def _text_side(side: list | tuple) -> records.Side:
    return records.Side(id=side[0], text=side[1], image=None, modality="text")


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded training pairs of one shard."""
    root, rules = task["read"]["root"], task["read"]["rules"]
    for item in task["items"]:
        path = item["image_path"]
        try:
            image, _ = image_files.read_image_file(os.path.join(root, path), root, rules)
        except image_files.ImageFileRefused as e:
            raise ConversionError(f"{path}: changed since it was checked: {e}") from e
        text = item["query_text"]
        query = records.Side(id=item["query_id"], text=text, image=image,
                             modality=records.modality_of(text is not None, True))
        yield records.encode_pair(records.TrainingPair(
            pair_id=item["pair_id"], query=query, instruction_set=(), task_id=0, dataset_id=0,
            positive=_text_side(item["positive"]), negatives=tuple(_text_side(n) for n in item["negatives"]),
            source_index=item["source_index"], extra=item["extra"]))


def _plans(items: list[dict], read: dict, shard_size: int) -> list[ShardPlan]:
    num = max(1, math.ceil(len(items) / shard_size))
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"items": items[start:stop]}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              **task})
        plans.append(ShardPlan(shard_name("train", i, num), digest, {**task, "read": read}))
    return plans


def convert_pairs(kind: str, source: str, images: str, out: str, *, strict: bool = False,
                  shard_size: int = RECORDS_PER_SHARD, workers: int = 1,
                  max_image_bytes: int = image_files.DEFAULT_MAX_IMAGE_BYTES, follow_external_symlinks: bool = False,
                  overwrite: bool = False) -> dict:
    """Converts one InstructCIR source file of format `kind` (module docstring); returns the manifest written."""
    if kind not in FORMATS:
        raise ConversionError(f"unknown format {kind!r}; choose from {FORMATS}")
    if shard_size < 1:
        raise ConversionError(f"shard_size must be >= 1, got {shard_size}")
    source, images, out = os.path.abspath(source), os.path.abspath(images), os.path.abspath(out)
    if not os.path.isfile(source):
        raise ConversionError(f"{source}: no such file")
    if not os.path.isdir(images):
        raise ConversionError(f"{images}: the image folder does not exist")
    file = os.path.basename(source)
    rules = image_files.ReadRules(max_image_bytes, follow_external_symlinks)
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    pairs, skips = READERS[kind](source)
    with process_pool(workers) as procs:
        pairs, probes, image_skips = _usable_images(pairs, images, rules, procs, file)
        skips = skips + image_skips
        report_skips(skips, strict=strict)
        if not pairs:
            raise ConversionError(f"{source}: no usable {kind} row")
        os.makedirs(out, exist_ok=True)
        state = open_shard_state(out, {"tool": TOOL_NAME, "format": kind})
        items = [{"pair_id": f"{file}:{n}", "query_id": p.query_id, "query_text": p.query_text,
                  "image_path": p.image_path, "file_size": probes[p.image_path]["size"],
                  "mtime_ns": probes[p.image_path]["mtime_ns"], "positive": list(p.positive),
                  "negatives": [list(x) for x in p.negatives], "source_index": p.source_index,
                  "extra": json.dumps(p.extra, sort_keys=True)} for n, p in enumerate(pairs)]
        plans = _plans(items, {"root": images, "rules": rules}, shard_size)
        infos, written, reused = write_shards(out, plans, _produce, state, pool=procs)
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "format": kind,
        "args": {"format": kind, "src": source, "images": images, "strict": strict, "shard_size": shard_size,
                 "max_image_bytes": max_image_bytes, "follow_external_symlinks": follow_external_symlinks},
        "sources": {file: file_sha256(source)},
        "counts": {"pairs": len(pairs), "images": len({p.image_path for p in pairs}),
                   "hard_negatives": sum(len(p.negatives) for p in pairs), "skipped": len(skips)},
        "shards": {"train": [dataclasses.asdict(i) for i in infos]},
        "skipped": [dataclasses.asdict(s) for s in skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("instructcir/%s: %d pairs, %d skipped; wrote %d shards, reused %d", kind, len(pairs), len(skips),
                 len(written), len(reused))
    return manifest
