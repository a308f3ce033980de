"""Record schema of IDMR synthetic triplets: (instance crop, location caption, full image).

Written by `data_prep.idmr_synth`, read by the IDMR training and evaluation pipelines. Every record goes through the
shared codec (`idmr_jax.data.records`): one msgpack map with ``version`` (== `SCHEMA_VERSION`), ``kind``
(== ``"triplet"``) and:

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
import os
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data import records as codec
from idmr_jax.data.records import Box, RecordError, Size, finite_number, integer, nonempty_bytes, rect, size, text

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


def _triplet(m: Mapping[str, Any]) -> TripletRecord:
    """Validates a raw map (from the wire or from `dataclasses.asdict`) into a TripletRecord."""
    image_size = size("image_size", m["image_size"])
    score = m["clip_score"]
    return TripletRecord(
        crop_jpeg=nonempty_bytes("crop_jpeg", m["crop_jpeg"]),
        image_jpeg=nonempty_bytes("image_jpeg", m["image_jpeg"]),
        caption=text("caption", m["caption"]),
        category=text("category", m["category"]),
        instance_id=text("instance_id", m["instance_id"]),
        annotation_id=text("annotation_id", m["annotation_id"]),
        image_id=text("image_id", m["image_id"]),
        box=rect("box", m["box"], image_size),
        crop_box=rect("crop_box", m["crop_box"], image_size),
        image_size=image_size,
        source=text("source", m["source"]),
        captioner=text("captioner", m["captioner"]),
        clip_score=None if score is None else finite_number("clip_score", score),
        source_index=integer("source_index", m["source_index"]),
    )


SCHEMA = codec.Schema(KIND, SCHEMA_VERSION, TripletRecord, _triplet)


def encode(record: TripletRecord) -> bytes:
    """Validates and serialises a triplet; the bytes are a pure function of the record (fixed key order)."""
    return codec.encode(SCHEMA, record)


def decode(data: bytes) -> TripletRecord:
    """Parses and validates one triplet record; raises `RecordError` naming the bad field."""
    return codec.decode(SCHEMA, data)


def read_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[TripletRecord]:
    """Reads and decodes every triplet of the matching shards in global key order (sorted shard names).

    Meant for tests, evaluation sets and small splits: it holds every record in memory. Training reads the
    shards through Grain's ``ArrayRecordDataSource`` and calls `decode` per record.
    """
    return codec.read_shards(pattern, decode)
