"""OACIRR record schema: what `idmr_jax.tasks.oacir.release` writes and the OACIR pipelines read.

Records go through the shared codec (`idmr_jax.data.records`: one msgpack map, ``version`` == `SCHEMA_VERSION`
and ``kind`` first). Two kinds exist.

Query record (``kind == "query"``): one (reference image + box + modification text -> target) quadruple.

    version                int    SCHEMA_VERSION
    kind                   str    "query"
    reference_image        bytes  encoded image file (original bytes, or re-encoded JPEG/PNG, see below)
    reference_name         str    image name (the key of the split map)
    reference_instance     str    instance id (the parent folder of the image's relative path)
    reference_box          [4 float] | nil   [x1, y1, x2, y2] in pixels of the *stored* image, 0 <= x1 < x2 <= w
    reference_size         [2 int]  (w, h) of the stored image
    reference_orig_size    [2 int]  (w, h) of the source image (boxes in the source file were in these pixels)
    object_category        str    anchored object's category, non-empty
    modification_text      str    the MLLM modification text, non-empty
    target_name            str
    target_instance        str
    subset                 str    "fashion" | "car" | "product" | "landmark", else the variant in lower case
    variant                str    the OACIRR variant the record was converted from ("Union", "Fashion", ...)
    source_index           int    position of the quadruple in the source caption file
    reference_gallery_index int   global key of the reference image in the gallery shards (read in order)
    target_gallery_index   int    global key of the target image in the gallery shards
    target_subset_vitG     [str] | nil   val only: the candidate subset shipped with the annotations

Gallery record (``kind == "gallery"``): one image of the split's image map.

    version, kind ("gallery"), image (bytes), name, instance, box ([4 float] | nil, stored-image pixels),
    image_size ([w, h] stored), orig_size ([w, h] source), subset, variant

Boxes are stored in the pixel frame of the *stored* bytes: when a converter re-encodes an image at a smaller
size it rescales the box by (new_w / w, new_h / h), so a consumer never needs the source file. Images are never
EXIF-rotated (the official OACIR loader does not rotate either, and the annotated boxes are in raw pixel order).

`decode_query` / `decode_gallery` validate every field; a malformed record raises `RecordError`, whose message
and ``field`` attribute name the offending field. A bump of `SCHEMA_VERSION` is required for any change of the
field set or of a field's meaning.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data import records as codec
from idmr_jax.data.records import Box, RecordError, Size, integer, nonempty_bytes, optional_rect, size, text

SCHEMA_VERSION = 1
QUERY_KIND = "query"
GALLERY_KIND = "gallery"

__all__ = ["GALLERY_KIND", "QUERY_KIND", "SCHEMA_VERSION", "GalleryRecord", "QueryRecord", "RecordError",
           "decode_any", "decode_gallery", "decode_query", "encode_gallery", "encode_query", "read_shards"]


@dataclasses.dataclass(frozen=True)
class QueryRecord:
    """One OACIRR quadruple with the reference image embedded; see the module docstring for field meanings."""

    reference_image: bytes
    reference_name: str
    reference_instance: str
    reference_box: Box | None
    reference_size: Size
    reference_orig_size: Size
    object_category: str
    modification_text: str
    target_name: str
    target_instance: str
    subset: str
    variant: str
    source_index: int
    reference_gallery_index: int
    target_gallery_index: int
    target_subset_vitG: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class GalleryRecord:
    """One gallery image; see the module docstring for field meanings."""

    image: bytes
    name: str
    instance: str
    box: Box | None
    image_size: Size
    orig_size: Size
    subset: str
    variant: str


def _subset_names(field: str, v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise RecordError(field, "expected a list of image names or nil")
    return tuple(v)


def _query(m: Mapping[str, Any]) -> QueryRecord:
    """Validates a raw map (from the wire or from `dataclasses.asdict`) into a QueryRecord."""
    ref_size = size("reference_size", m["reference_size"])
    return QueryRecord(
        reference_image=nonempty_bytes("reference_image", m["reference_image"]),
        reference_name=text("reference_name", m["reference_name"]),
        reference_instance=text("reference_instance", m["reference_instance"]),
        reference_box=optional_rect("reference_box", m["reference_box"], ref_size),
        reference_size=ref_size,
        reference_orig_size=size("reference_orig_size", m["reference_orig_size"]),
        object_category=text("object_category", m["object_category"]),
        modification_text=text("modification_text", m["modification_text"]),
        target_name=text("target_name", m["target_name"]),
        target_instance=text("target_instance", m["target_instance"]),
        subset=text("subset", m["subset"]),
        variant=text("variant", m["variant"]),
        source_index=integer("source_index", m["source_index"]),
        reference_gallery_index=integer("reference_gallery_index", m["reference_gallery_index"]),
        target_gallery_index=integer("target_gallery_index", m["target_gallery_index"]),
        target_subset_vitG=_subset_names("target_subset_vitG", m["target_subset_vitG"]),
    )


def _gallery(m: Mapping[str, Any]) -> GalleryRecord:
    """Validates a raw map into a GalleryRecord."""
    image_size = size("image_size", m["image_size"])
    return GalleryRecord(
        image=nonempty_bytes("image", m["image"]),
        name=text("name", m["name"]),
        instance=text("instance", m["instance"]),
        box=optional_rect("box", m["box"], image_size),
        image_size=image_size,
        orig_size=size("orig_size", m["orig_size"]),
        subset=text("subset", m["subset"]),
        variant=text("variant", m["variant"]),
    )


QUERY_SCHEMA = codec.Schema(QUERY_KIND, SCHEMA_VERSION, QueryRecord, _query)
GALLERY_SCHEMA = codec.Schema(GALLERY_KIND, SCHEMA_VERSION, GalleryRecord, _gallery)


def encode_query(record: QueryRecord) -> bytes:
    """Validates and serialises a query record."""
    return codec.encode(QUERY_SCHEMA, record)


def decode_query(data: bytes) -> QueryRecord:
    """Parses and validates a query record; raises `RecordError` naming the bad field."""
    return codec.decode(QUERY_SCHEMA, data)


def encode_gallery(record: GalleryRecord) -> bytes:
    """Validates and serialises a gallery record."""
    return codec.encode(GALLERY_SCHEMA, record)


def decode_gallery(data: bytes) -> GalleryRecord:
    """Parses and validates a gallery record; raises `RecordError` naming the bad field."""
    return codec.decode(GALLERY_SCHEMA, data)


def decode_any(data: bytes) -> QueryRecord | GalleryRecord:
    """Decodes a record of either kind, dispatching on its ``kind`` field."""
    return codec.decode_any((QUERY_SCHEMA, GALLERY_SCHEMA), data)


def read_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[QueryRecord | GalleryRecord]:
    """Every record (either kind) of the matching shards, in global key order; see `codec.read_shards`."""
    return codec.read_shards(pattern, decode_any)
