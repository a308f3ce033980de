"""OACIRR (released layout) -> ArrayRecord shards of query and gallery records, with a manifest.

`convert` is the converter behind the CLI (and the laptop demo, `idmr_jax.tasks.oacir.demo`); the layout reading
and its checks are in `idmr_jax.tasks.oacir.release_layout`.

    python -m data_prep.oacirr --root /data/OACIRR --variant Fashion --split val --out /data/ar/fashion-val \
        [--num-shards 8] [--gallery-shards 4] [--max-side 512] [--workers 8] [--strict] \
        [--max-image-bytes 67108864] [--follow-external-symlinks] [--overwrite]

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

Record schema: `idmr_jax.tasks.oacir.records`. Images are stored as their original file bytes; with
``--max-side`` an image whose longer side exceeds it is resized (Lanczos) and re-encoded (JPEG q95 for JPEG
sources, else PNG) and its boxes are rescaled to the stored pixels. Every image is fully decoded once here to
catch broken files.

Bad input (each found before anything is written; ``--strict`` turns any of them into an error):

| problem                                   | code                     | action                              |
|-------------------------------------------|--------------------------|-------------------------------------|
| image missing / does not decode           | missing/undecodable_image| gallery record skipped              |
| path with a '..' part or absolute         | unsafe_path              | gallery record skipped              |
| image resolving outside --root (a symlink)| outside_root             | gallery record skipped              |
| image not a regular file (FIFO, device..)| not_regular_file         | gallery record skipped, not opened  |
| image file over --max-image-bytes         | image_too_large          | gallery record skipped              |
| path without an instance folder           | no_instance              | gallery record skipped              |
| name repeated in a JSON map               | duplicate_name           | later entries skipped (first kept)  |
| query naming an image not in the split map| unknown_name             | query skipped                       |
| query naming a skipped image              | unusable_image           | query skipped                       |
| empty modification text / category        | empty_text               | query skipped                       |
| box non-finite / zero-area / outside      | box_nonfinite/empty/outside | query skipped; gallery box dropped |
| missing or mistyped field                 | missing_field / bad_type | query skipped                       |

Image files are read under `idmr_jax.data.image_files.ReadRules`: every path is resolved and must lie inside the
resolved ``--root`` (links between the dataset's own folders are fine); with ``--follow-external-symlinks`` links
leaving it are followed and listed in the manifest (``external_links``, counted in ``counts.external_links``).

An existing ``manifest.json`` in ``--out`` that this tool did not write is never replaced without ``--overwrite``.

Boxes may exceed the image by up to `release_layout.BOX_TOLERANCE_PX` (annotation rounding); they are then
clipped to it and counted in ``counts.boxes_clipped``. A missing or null box is kept as "no box" and counted, not
skipped.

Resuming: finished shards are listed, with the digest of their inputs and their sha256, in ``.convert_state.json``;
a rerun rewrites only shards whose file is missing or altered or whose inputs changed (see `idmr_jax.data.shards`).
Image decode results are cached in ``.probe_cache.json`` (keyed by file size and mtime). One converter per folder.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
from collections.abc import Iterator, Sequence

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
from idmr_jax.tasks.oacir import records
from idmr_jax.tasks.oacir.release_layout import SPLITS, TOOL_VERSION, VARIANTS, plan_conversion

__all__ = ["MANIFEST", "RECORDS_PER_SHARD", "SPLITS", "TOOL_VERSION", "VARIANTS", "ConversionError", "ConvertResult",
           "convert"]

RECORDS_PER_SHARD = 1000  # default shard size: ~100-300 MB of images per shard at OACIRR's image sizes
MANIFEST = "manifest.json"
# The tool is named after its CLI (as before it moved into the library), so existing outputs resume.
TOOL_NAME = "data_prep.oacirr"


# --- shard production (runs in worker processes) -------------------------------------------------------------


def _load_image(item: dict, max_side: int, read: dict) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Reads an image's bytes (under the read rules ``read``), re-encoded if it exceeds ``max_side``;
    -> (bytes, stored (w, h), source (w, h))."""
    try:
        data, _ = image_files.read_image_file(item["path"], read["root"], read["rules"])
    except image_files.ImageFileRefused as e:
        raise ConversionError(f"{item['path']}: changed since it was checked: {e}") from e
    if len(data) != item["size"]:
        raise ConversionError(f"{item['path']}: changed since it was checked ({len(data)} != {item['size']} bytes)")
    orig = (item["width"], item["height"])
    if max_side and max(orig) > max_side:
        return image_files.shrink_to_max_side(data, max_side)
    return data, orig, orig


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded records of one shard, in plan order."""
    max_side, variant, read = task["max_side"], task["variant"], task["read"]
    for item in task["items"]:
        if task["kind"] == records.GALLERY_KIND:
            data, size, orig = _load_image(item, max_side, read)
            yield records.encode_gallery(records.GalleryRecord(
                image=data, name=item["name"], instance=item["instance"],
                box=image_files.scale_box(item["box"], orig, size), image_size=size, orig_size=orig,
                subset=item["subset"], variant=variant))
        else:
            ref = item["ref"]
            data, size, orig = _load_image(ref, max_side, read)
            group = item["group"]
            yield records.encode_query(records.QueryRecord(
                reference_image=data, reference_name=ref["name"], reference_instance=ref["instance"],
                reference_box=image_files.scale_box(item["box"], orig, size), reference_size=size,
                reference_orig_size=orig, object_category=item["category"], modification_text=item["text"],
                target_name=item["target_name"], target_instance=item["target_instance"], subset=ref["subset"],
                variant=variant, source_index=item["index"], reference_gallery_index=item["ref_key"],
                target_gallery_index=item["target_key"], target_subset_vitG=None if group is None else tuple(group)))


def _shard_plans(prefix: str, kind: str, items: list[dict], num: int, max_side: int, variant: str,
                 read: dict) -> list[ShardPlan]:
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"kind": kind, "items": items[start:stop], "max_side": max_side, "variant": variant}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              **task})
        # The read rules decide which files were planned (so the items), not a byte of a shard: not digested.
        plans.append(ShardPlan(shard_name(prefix, i, num), digest, {**task, "read": read}))
    return plans


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What `convert` did: the manifest it wrote, and which shard files it wrote or found finished."""

    manifest: dict
    written: list[str]
    reused: list[str]


def convert(root: str, variant: str, split: str, out: str, *, num_shards: int | None = None,
            gallery_shards: int | None = None, max_side: int = 0, workers: int = 1,
            strict: bool = False, max_image_bytes: int = image_files.DEFAULT_MAX_IMAGE_BYTES,
            follow_external_symlinks: bool = False, overwrite: bool = False) -> ConvertResult:
    """Converts one OACIRR variant/split; see the module docstring. ``None`` shard counts mean
    ceil(records / RECORDS_PER_SHARD). Image files are read under
    ``ReadRules(max_image_bytes, follow_external_symlinks)`` with ``root`` as the dataset root. Raises
    `ConversionError` on a broken layout, on a ``manifest.json`` in ``out`` this tool did not write (unless
    ``overwrite``), and under ``strict`` on any entry that would be skipped (the message lists each one by file,
    record and field)."""
    if variant not in VARIANTS:
        raise ConversionError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if split not in SPLITS:
        raise ConversionError(f"unknown split {split!r}; choose from {SPLITS}")
    for flag, v in (("num_shards", num_shards), ("gallery_shards", gallery_shards)):
        if v is not None and v < 1:
            raise ConversionError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if max_image_bytes < 1:
        raise ConversionError(f"--max-image-bytes must be >= 1, got {max_image_bytes}")
    rules = image_files.ReadRules(max_image_bytes, follow_external_symlinks)
    root, out = os.path.abspath(root), os.path.abspath(out)
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    os.makedirs(out, exist_ok=True)
    # The root is not part of the identity: a moved dataset changes the shard digests, so shards are redone.
    try:
        state = ShardState(out, {"tool": TOOL_NAME, "variant": variant, "split": split})
    except RuntimeError as e:
        raise ConversionError(str(e)) from e

    with process_pool(workers) as pool:
        plan = plan_conversion(root, variant, split, out, pool, workers, rules)
        if strict and plan.skips:
            n = len(plan.skips)
            lines = "\n".join(s.describe() for s in plan.skips)
            raise ConversionError(f"--strict: {n} bad input entr{'y' if n == 1 else 'ies'}:\n{lines}")
        for s in plan.skips:
            logging.warning("skipped: %s", s.describe())
        nq = num_shards or max(1, math.ceil(len(plan.queries) / RECORDS_PER_SHARD))
        ng = gallery_shards or max(1, math.ceil(len(plan.gallery) / RECORDS_PER_SHARD))
        read = {"root": root, "rules": rules}
        q_plans = _shard_plans("queries", records.QUERY_KIND, plan.queries, nq, max_side, variant, read)
        g_plans = _shard_plans("gallery", records.GALLERY_KIND, plan.gallery, ng, max_side, variant, read)
        infos, written, reused = write_shards(out, g_plans + q_plans, _produce, state, pool=pool)
    expected = {p.file for p in q_plans + g_plans}
    for stale in sorted(glob.glob(os.path.join(out, "*.array_record"))):
        if os.path.basename(stale) not in expected:
            logging.warning("%s is not part of this conversion (left in place; read shards via the manifest)", stale)

    def listing(plans: Sequence[ShardPlan]) -> list[dict]:
        by_file = {i.file: i for i in infos}
        return [dataclasses.asdict(by_file[p.file]) for p in plans]

    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "dataset": "OACIRR",
        "variant": variant,
        "split": split,
        # --workers is left out on purpose: it does not change a byte of the output.
        "args": {"root": root, "variant": variant, "split": split, "num_shards": num_shards,
                 "gallery_shards": gallery_shards, "max_side": max_side, "strict": strict,
                 "max_image_bytes": max_image_bytes, "follow_external_symlinks": follow_external_symlinks},
        "sources": plan.sources,
        "counts": plan.counts,
        "shards": {"queries": listing(q_plans), "gallery": listing(g_plans)},
        "skipped": [dataclasses.asdict(s) for s in plan.skips],
        "external_links": plan.external_links,
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    if plan.external_links:
        logging.warning("followed %d symlink(s) outside %s (listed in the manifest)", len(plan.external_links), root)
    logging.info("%s/%s: %d queries, %d gallery images, %d skipped entries; wrote %d shards, reused %d",
                 variant, split, len(plan.queries), len(plan.gallery), len(plan.skips), len(written), len(reused))
    return ConvertResult(manifest, written, reused)
