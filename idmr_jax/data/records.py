"""Record schema shared by the dataset converters (`data_prep/`) and the Grain input pipeline.

Every record is one msgpack map (``use_bin_type=True``, so image bytes stay ``bytes`` and text stays ``str``).
Two kinds exist; both carry ``version`` (== `SCHEMA_VERSION`) and ``kind``.

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
import glob
import math
import os
from collections.abc import Sequence
from typing import Any

import msgpack

SCHEMA_VERSION = 1
QUERY_KIND = "query"
GALLERY_KIND = "gallery"

Box = tuple[float, float, float, float]
Size = tuple[int, int]


class RecordError(ValueError):
    """A record failed validation; ``field`` names the offending field (None for the record as a whole)."""

    def __init__(self, field: str | None, message: str):
        self.field = field
        super().__init__(f"field '{field}': {message}" if field else message)


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


# --- field checkers: each returns the canonical value or raises RecordError naming the field ------------------


def _bytes(field: str, v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise RecordError(field, f"expected non-empty bytes, got {type(v).__name__}")
    return bytes(v)


def _str(field: str, v: Any, *, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise RecordError(field, f"expected str, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise RecordError(field, "empty string")
    return v


def _int(field: str, v: Any, *, minimum: int = 0) -> int:
    # bool is an int subclass; a True where an index belongs is a bug, not a 1.
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecordError(field, f"expected int >= {minimum}, got {v!r}")
    return v


def _size(field: str, v: Any) -> Size:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise RecordError(field, f"expected [w, h], got {v!r}")
    return (_int(field, v[0], minimum=1), _int(field, v[1], minimum=1))


def _box(field: str, v: Any, size: Size) -> Box | None:
    """A box must be finite, have positive area and lie inside the stored image (converters clip first)."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise RecordError(field, f"expected [x1, y1, x2, y2] or nil, got {v!r}")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in v):
        raise RecordError(field, f"box values must be numbers, got {v!r}")
    x1, y1, x2, y2 = (float(c) for c in v)
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
        raise RecordError(field, f"box has non-finite values {v!r}")
    if not (x2 > x1 and y2 > y1):
        raise RecordError(field, f"box has zero or negative area {v!r}")
    w, h = size
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise RecordError(field, f"box {v!r} outside the {w}x{h} image")
    return (x1, y1, x2, y2)


def _subset_names(field: str, v: Any) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise RecordError(field, "expected a list of image names or nil")
    return tuple(v)


def _query_fields(m: dict) -> QueryRecord:
    """Validates a raw map (from the wire or from `dataclasses.asdict`) into a QueryRecord."""
    size = _size("reference_size", m["reference_size"])
    return QueryRecord(
        reference_image=_bytes("reference_image", m["reference_image"]),
        reference_name=_str("reference_name", m["reference_name"]),
        reference_instance=_str("reference_instance", m["reference_instance"]),
        reference_box=_box("reference_box", m["reference_box"], size),
        reference_size=size,
        reference_orig_size=_size("reference_orig_size", m["reference_orig_size"]),
        object_category=_str("object_category", m["object_category"]),
        modification_text=_str("modification_text", m["modification_text"]),
        target_name=_str("target_name", m["target_name"]),
        target_instance=_str("target_instance", m["target_instance"]),
        subset=_str("subset", m["subset"]),
        variant=_str("variant", m["variant"]),
        source_index=_int("source_index", m["source_index"]),
        reference_gallery_index=_int("reference_gallery_index", m["reference_gallery_index"]),
        target_gallery_index=_int("target_gallery_index", m["target_gallery_index"]),
        target_subset_vitG=_subset_names("target_subset_vitG", m["target_subset_vitG"]),
    )


def _gallery_fields(m: dict) -> GalleryRecord:
    size = _size("image_size", m["image_size"])
    return GalleryRecord(
        image=_bytes("image", m["image"]),
        name=_str("name", m["name"]),
        instance=_str("instance", m["instance"]),
        box=_box("box", m["box"], size),
        image_size=size,
        orig_size=_size("orig_size", m["orig_size"]),
        subset=_str("subset", m["subset"]),
        variant=_str("variant", m["variant"]),
    )


_KINDS = {QUERY_KIND: (QueryRecord, _query_fields), GALLERY_KIND: (GalleryRecord, _gallery_fields)}


def _encode(kind: str, record: Any) -> bytes:
    cls, check = _KINDS[kind]
    if not isinstance(record, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(record).__name__}")
    fields = dataclasses.asdict(record)
    check(fields)  # the same checks as on decode: never write what could not be read back
    # A fixed key order (header, then dataclass order) makes the bytes a pure function of the record.
    out: dict[str, Any] = {"version": SCHEMA_VERSION, "kind": kind}
    for k, v in fields.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return msgpack.packb(out, use_bin_type=True)


def _decode(kind: str, data: bytes) -> Any:
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise RecordError(None, f"not a msgpack record: {e}") from e
    if not isinstance(m, dict):
        raise RecordError(None, f"expected a map, got {type(m).__name__}")
    if m.get("version") != SCHEMA_VERSION:
        raise RecordError("version", f"expected {SCHEMA_VERSION}, got {m.get('version')!r}")
    if m.get("kind") != kind:
        raise RecordError("kind", f"expected {kind!r}, got {m.get('kind')!r}")
    cls, check = _KINDS[kind]
    expected = {f.name for f in dataclasses.fields(cls)}
    present = set(m) - {"version", "kind"}
    if missing := sorted(expected - present):
        raise RecordError(missing[0], "missing")
    if unknown := sorted(present - expected):
        raise RecordError(unknown[0], f"unknown field for schema version {SCHEMA_VERSION}")
    return check(m)


def encode_query(record: QueryRecord) -> bytes:
    """Validates and serialises a query record."""
    return _encode(QUERY_KIND, record)


def decode_query(data: bytes) -> QueryRecord:
    """Parses and validates a query record; raises `RecordError` naming the bad field."""
    return _decode(QUERY_KIND, data)


def encode_gallery(record: GalleryRecord) -> bytes:
    """Validates and serialises a gallery record."""
    return _encode(GALLERY_KIND, record)


def decode_gallery(data: bytes) -> GalleryRecord:
    """Parses and validates a gallery record; raises `RecordError` naming the bad field."""
    return _decode(GALLERY_KIND, data)


def decode_any(data: bytes) -> QueryRecord | GalleryRecord:
    """Decodes a record of either kind, dispatching on its ``kind`` field."""
    try:
        kind = msgpack.unpackb(data, raw=False).get("kind")
    except Exception as e:
        raise RecordError(None, f"not a msgpack record: {e}") from e
    if kind not in _KINDS:
        raise RecordError("kind", f"unknown record kind {kind!r}")
    return _decode(kind, data)


def shard_paths(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a glob (or passes a list through) into shard paths in sorted order.

    Sorted order matters: the gallery indices stored in query records are global keys over the gallery shards
    concatenated in shard-number order, which is what the zero-padded names sort into.
    """
    if isinstance(pattern, (str, os.PathLike)):
        paths = sorted(glob.glob(os.fspath(pattern)))
        if not paths:
            raise FileNotFoundError(f"no shard matches {os.fspath(pattern)!r}")
        return paths
    return [os.fspath(p) for p in pattern]


def read_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[QueryRecord | GalleryRecord]:
    """Reads and decodes every record of the matching ArrayRecord shards, in global key order.

    Uses array_record's `ArrayRecordDataSource` (the class Grain's `ArrayRecordDataSource` extends), so the keys
    seen here are the keys a Grain pipeline over the same shard list sees. Meant for tests and small splits: it
    holds every record (with its image bytes) in memory.
    """
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    paths = shard_paths(pattern)
    with ArrayRecordDataSource(paths) as source:
        n = len(source)
        raw = source.__getitems__(range(n)) if n else []
    return [decode_any(r) for r in raw]
