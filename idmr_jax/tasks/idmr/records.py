"""Record schema of IDMR synthetic triplets: (instance crop, location caption, full image).

Written by `data_prep.idmr_synth`, read by the IDMR training and evaluation pipelines. Every record is one msgpack
map (``use_bin_type=True``) with ``version`` (== `SCHEMA_VERSION`), ``kind`` (== ``"triplet"``) and:

    crop_jpeg      bytes        JPEG of the instance crop (the box, grown by the context padding, clipped)
    image_jpeg     bytes        JPEG of the full image (the source bytes when they were a JPEG and not resized)
    caption        str          location caption of the full image: where the instance is / its surroundings
    category       str          the instance's category name
    instance_id    str          identity of the physical instance: equal across images of the same object when
                                the source says so (e.g. the demo benchmark), else equal to ``annotation_id``
    annotation_id  str          unique per record: ``<source>:<annotation id>``
    image_id       str          ``<source>:<image id>``
    box            [4 float]    the instance box [x1, y1, x2, y2] in pixels of the *stored* full image (clipped)
    crop_box       [4 float]    the rectangle of the stored full image that ``crop_jpeg`` shows, same frame; the
                                crop is cut from the source-resolution image, so this is an integer pixel rectangle
                                unless the full image was downsized (then it is that rectangle, scaled)
    image_size     [2 int]      (w, h) of the stored full image
    source         str          dataset the triplet came from ("coco", "tfds:coco/2017", "demo", ...)
    captioner      str          what wrote the caption ("template", "mllm:<model>")
    clip_score     float | nil  CLIP cosine similarity of the crop with "a photo of a {category}", nil if unscored
    source_index   int          position of the annotation in the source (annotation list / TFDS example order)

``image_jpeg`` decodes with PIL to ``image_size``; ``crop_jpeg`` to the extent of ``crop_box`` (in source pixels).
`decode` validates every field and raises `records.RecordError` naming the offending one; `encode` runs the same
checks, so nothing is written that could not be read back. A change of the field set or of a field's meaning needs
a bump of `SCHEMA_VERSION`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import msgpack

from idmr_jax.data.records import Box, RecordError, Size, shard_paths

SCHEMA_VERSION = 1
KIND = "triplet"

__all__ = ["KIND", "SCHEMA_VERSION", "RecordError", "TripletRecord", "decode", "encode", "read_shards"]


@dataclasses.dataclass(frozen=True)
class TripletRecord:
    """One synthetic IDMR triplet; see the module docstring for field meanings."""

    crop_jpeg: bytes
    image_jpeg: bytes
    caption: str
    category: str
    instance_id: str
    annotation_id: str
    image_id: str
    box: Box
    crop_box: Box
    image_size: Size
    source: str
    captioner: str
    clip_score: float | None
    source_index: int


# --- field checkers: each returns the canonical value or raises RecordError naming the field ------------------


def _bytes(field: str, v: Any) -> bytes:
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise RecordError(field, f"expected non-empty bytes, got {type(v).__name__}")
    return bytes(v)


def _str(field: str, v: Any) -> str:
    if not isinstance(v, str):
        raise RecordError(field, f"expected str, got {type(v).__name__}")
    if not v.strip():
        raise RecordError(field, "empty string")
    return v


def _int(field: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:  # a bool is not an index
        raise RecordError(field, f"expected int >= {minimum}, got {v!r}")
    return v


def _numbers(field: str, v: Any, n: int) -> tuple[float, ...]:
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise RecordError(field, f"expected a list of {n} numbers, got {v!r}")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in v):
        raise RecordError(field, f"values must be numbers, got {v!r}")
    if not all(math.isfinite(c) for c in v):
        raise RecordError(field, f"non-finite values {v!r}")
    return tuple(v)


def _rect(field: str, v: Any, size: Size) -> Box:
    """A rectangle inside the image with positive area."""
    x1, y1, x2, y2 = _numbers(field, v, 4)
    if not (x2 > x1 and y2 > y1):
        raise RecordError(field, f"zero or negative area {v!r}")
    w, h = size
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise RecordError(field, f"{v!r} outside the {w}x{h} image")
    return (float(x1), float(y1), float(x2), float(y2))


def _check(m: dict) -> TripletRecord:
    """Validates a raw map (from the wire or from `dataclasses.asdict`) into a TripletRecord."""
    w, h = _numbers("image_size", m["image_size"], 2)
    size = (_int("image_size", w, 1), _int("image_size", h, 1))
    score = m["clip_score"]
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not math.isfinite(score)):
        raise RecordError("clip_score", f"expected a finite float or nil, got {score!r}")
    return TripletRecord(
        crop_jpeg=_bytes("crop_jpeg", m["crop_jpeg"]),
        image_jpeg=_bytes("image_jpeg", m["image_jpeg"]),
        caption=_str("caption", m["caption"]),
        category=_str("category", m["category"]),
        instance_id=_str("instance_id", m["instance_id"]),
        annotation_id=_str("annotation_id", m["annotation_id"]),
        image_id=_str("image_id", m["image_id"]),
        box=_rect("box", m["box"], size),
        crop_box=_rect("crop_box", m["crop_box"], size),
        image_size=size,
        source=_str("source", m["source"]),
        captioner=_str("captioner", m["captioner"]),
        clip_score=None if score is None else float(score),
        source_index=_int("source_index", m["source_index"], 0),
    )


def encode(record: TripletRecord) -> bytes:
    """Validates and serialises a triplet; the bytes are a pure function of the record (fixed key order)."""
    if not isinstance(record, TripletRecord):
        raise TypeError(f"expected TripletRecord, got {type(record).__name__}")
    fields = dataclasses.asdict(record)
    _check(fields)
    out: dict[str, Any] = {"version": SCHEMA_VERSION, "kind": KIND}
    for k, v in fields.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return msgpack.packb(out, use_bin_type=True)


def decode(data: bytes) -> TripletRecord:
    """Parses and validates one triplet record; raises `RecordError` naming the bad field."""
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise RecordError(None, f"not a msgpack record: {e}") from e
    if not isinstance(m, dict):
        raise RecordError(None, f"expected a map, got {type(m).__name__}")
    if m.get("version") != SCHEMA_VERSION:
        raise RecordError("version", f"expected {SCHEMA_VERSION}, got {m.get('version')!r}")
    if m.get("kind") != KIND:
        raise RecordError("kind", f"expected {KIND!r}, got {m.get('kind')!r}")
    expected = {f.name for f in dataclasses.fields(TripletRecord)}
    present = set(m) - {"version", "kind"}
    if missing := sorted(expected - present):
        raise RecordError(missing[0], "missing")
    if unknown := sorted(present - expected):
        raise RecordError(unknown[0], f"unknown field for schema version {SCHEMA_VERSION}")
    return _check(m)


def read_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[TripletRecord]:
    """Reads and decodes every triplet of the matching shards in global key order (sorted shard names).

    Meant for tests, evaluation sets and small splits: it holds every record in memory. Training reads the
    shards through Grain's ``ArrayRecordDataSource`` and calls `decode` per record.
    """
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    paths = shard_paths(pattern)
    with ArrayRecordDataSource(paths) as source:
        n = len(source)
        raw = source.__getitems__(range(n)) if n else []
    return [decode(r) for r in raw]
