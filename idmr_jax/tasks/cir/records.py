"""Record schema of converted CIR benchmarks (CIRR, CIRCO, FashionIQ, GeneCIS): one schema for all of them.

Written by `idmr_jax.tasks.cir.convert` (CLI ``python -m data_prep.cir``; the TFDS builders write the same
fields), read by the evaluation. Every record goes through the shared codec (`idmr_jax.data.records`): one msgpack
map with ``version`` (== `SCHEMA_VERSION`) and ``kind`` first. Two kinds:

Image record (``kind == "image"``), one per image of the release (``images-*.array_record``, in the release's
order: the gallery's rank-tie order):

    image        bytes        the image file's bytes (a crop: the region cut out and padded to a black square, PNG)
    key          str          unique key within the release (`benchmarks.base.Image.key`)
    image_id     str          the benchmark's own image name or id
    group        str          the gallery it belongs to ("" = the one gallery; FashionIQ category; GeneCIS task)
    crop         [4 float] | nil   the source-pixel region a crop was cut from (clamped to the photo)
    image_size   [2 int]      (w, h) of the stored image

Query record (``kind == "query"``, ``queries-*.array_record``, in annotation-file order):

    query_id     str          the benchmark's own query id
    text         str          the modification text the model reads (may not be empty)
    reference    str          key of the reference image
    reference_index int       its global key in the image shards (read in order)
    targets      [str]        keys of the relevant images, the main target first ([] on unlabelled splits)
    group        str          the gallery the query ranks
    candidates   [str] | nil  the query's own candidate pool (GeneCIS slot order), nil = the group's gallery
    subset       [str]        CIRR img_set members (keys), [] elsewhere
    extra        str          JSON object: what else the release says about the query (never read by a model)
    source_index int          the query's position in its annotation file

Both kinds also carry ``benchmark`` and ``split``. `decode_*` validate every field and raise `RecordError` naming
the offending one; `encode` runs the same checks. A change of the field set or a field's meaning needs a bump of
`SCHEMA_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data import records as codec
from idmr_jax.data.records import (Box, RecordError, Size, finite_number, integer, json_object_text, nonempty_bytes,
                                   size, text, text_list)

SCHEMA_VERSION = 1
IMAGE_KIND = "image"
QUERY_KIND = "query"

__all__ = ["IMAGE_KIND", "QUERY_KIND", "SCHEMA_VERSION", "ImageRecord", "QueryRecord", "RecordError",
           "decode_image", "decode_query", "encode_image", "encode_query", "read_images", "read_queries"]


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a converted release; see the module docstring."""

    image: bytes
    key: str
    image_id: str
    group: str
    crop: Box | None
    image_size: Size
    benchmark: str
    split: str


@dataclasses.dataclass(frozen=True)
class QueryRecord:
    """One query of a converted release; see the module docstring."""

    query_id: str
    text: str
    reference: str
    reference_index: int
    targets: tuple[str, ...]
    group: str
    candidates: tuple[str, ...] | None
    subset: tuple[str, ...]
    extra: str
    source_index: int
    benchmark: str
    split: str

    @property
    def extra_fields(self) -> dict:
        """`extra` parsed."""
        return json.loads(self.extra)


def _crop(field: str, v: Any) -> Box | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise RecordError(field, "expected [x1, y1, x2, y2] or nil")
    box = tuple(finite_number(f"{field}[{i}]", x) for i, x in enumerate(v))
    if not (box[0] < box[2] and box[1] < box[3]):
        raise RecordError(field, f"empty region {list(box)}")
    return box


def _image(m: Mapping[str, Any]) -> ImageRecord:
    return ImageRecord(image=nonempty_bytes("image", m["image"]), key=text("key", m["key"]),
                       image_id=text("image_id", m["image_id"]), group=text("group", m["group"], allow_empty=True),
                       crop=_crop("crop", m["crop"]), image_size=size("image_size", m["image_size"]),
                       benchmark=text("benchmark", m["benchmark"]), split=text("split", m["split"]))


def _query(m: Mapping[str, Any]) -> QueryRecord:
    cands = m["candidates"]
    return QueryRecord(
        query_id=text("query_id", m["query_id"]), text=text("text", m["text"]),
        reference=text("reference", m["reference"]), reference_index=integer("reference_index", m["reference_index"]),
        targets=text_list("targets", m["targets"]), group=text("group", m["group"], allow_empty=True),
        candidates=None if cands is None else text_list("candidates", cands), subset=text_list("subset", m["subset"]),
        extra=json_object_text("extra", m["extra"]), source_index=integer("source_index", m["source_index"]),
        benchmark=text("benchmark", m["benchmark"]), split=text("split", m["split"]))


IMAGE_SCHEMA = codec.Schema(IMAGE_KIND, SCHEMA_VERSION, ImageRecord, _image)
QUERY_SCHEMA = codec.Schema(QUERY_KIND, SCHEMA_VERSION, QueryRecord, _query)


def encode_image(record: ImageRecord) -> bytes:
    """Validates and serialises an image record."""
    return codec.encode(IMAGE_SCHEMA, record)


def encode_query(record: QueryRecord) -> bytes:
    """Validates and serialises a query record."""
    return codec.encode(QUERY_SCHEMA, record)


def decode_image(data: bytes) -> ImageRecord:
    """Parses and validates one image record; `RecordError` names the bad field."""
    return codec.decode(IMAGE_SCHEMA, data)


def decode_query(data: bytes) -> QueryRecord:
    """Parses and validates one query record; `RecordError` names the bad field."""
    return codec.decode(QUERY_SCHEMA, data)


def read_images(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[ImageRecord]:
    """Every image record of the matching shards, in global key order."""
    return codec.read_shards(pattern, decode_image)


def read_queries(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[QueryRecord]:
    """Every query record of the matching shards, in global key order."""
    return codec.read_shards(pattern, decode_query)
