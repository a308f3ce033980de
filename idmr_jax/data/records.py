"""The record codec shared by every task's shards: msgpack maps with a ``kind`` tag and a schema ``version``.

A task describes each of its record kinds with a `Schema` (kind, version, frozen dataclass, validator) and gets
`encode` / `decode` / `decode_any` / `read_shards` from here; the schemas themselves live with their tasks
(`idmr_jax.tasks.oacir.records`: OACIRR query and gallery records; `idmr_jax.tasks.idmr.records`: IDMR triplets).

Wire format: one msgpack map per record (``use_bin_type=True``, so image bytes stay ``bytes`` and text stays
``str``): ``version`` and ``kind`` first, then the dataclass fields in declaration order, tuples written as
arrays. The fixed key order makes the bytes a pure function of the record.

Validation: a schema's validator turns a raw map (from the wire, or `dataclasses.asdict` of a record) into the
record, using the field checkers below; each raises `RecordError` naming the offending field. `encode` runs the
same checks as `decode`, so nothing is written that could not be read back.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgpack

Box = tuple[float, float, float, float]
Size = tuple[int, int]
HEADER = ("version", "kind")
T = TypeVar("T")


class RecordError(ValueError):
    """A record failed validation; ``field`` names the offending field (None for the record as a whole)."""

    def __init__(self, field: str | None, message: str):
        self.field = field
        super().__init__(f"field '{field}': {message}" if field else message)


@dataclasses.dataclass(frozen=True)
class Schema:
    """One record kind: its ``kind`` tag, schema ``version``, dataclass, and ``validate`` (raw map -> record,
    raising `RecordError`). A change of the field set or of a field's meaning needs a new version."""

    kind: str
    version: int
    record_type: type
    validate: Callable[[Mapping[str, Any]], Any]


# --- field checkers: each returns the canonical value or raises RecordError naming the field ------------------


def nonempty_bytes(field: str, v: Any) -> bytes:
    """Non-empty bytes (e.g. an encoded image)."""
    if not isinstance(v, (bytes, bytearray)) or not v:
        raise RecordError(field, f"expected non-empty bytes, got {type(v).__name__}")
    return bytes(v)


def text(field: str, v: Any, *, allow_empty: bool = False) -> str:
    """A str; unless `allow_empty`, one with some non-space character."""
    if not isinstance(v, str):
        raise RecordError(field, f"expected str, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise RecordError(field, "empty string")
    return v


def text_list(field: str, v: Any) -> tuple[str, ...]:
    """A list of non-empty strs (e.g. image keys or ids), as a tuple; `RecordError` names the bad entry."""
    if not isinstance(v, (list, tuple)):
        raise RecordError(field, f"expected a list of strings, got {type(v).__name__}")
    return tuple(text(f"{field}[{i}]", x) for i, x in enumerate(v))


def json_object_text(field: str, v: Any) -> str:
    """A str holding a JSON object (a record's free-form ``extra`` metadata)."""
    s = text(field, v)
    try:
        if not isinstance(json.loads(s), dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise RecordError(field, f"expected a JSON object: {e}") from None
    return s


def integer(field: str, v: Any, *, minimum: int = 0) -> int:
    """An int >= `minimum`."""
    # bool is an int subclass; a True where an index belongs is a bug, not a 1.
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RecordError(field, f"expected int >= {minimum}, got {v!r}")
    return v


def finite_number(field: str, v: Any) -> float:
    """A finite int or float (not a bool), as a float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RecordError(field, f"expected a finite number, got {v!r}")
    return float(v)


def size(field: str, v: Any) -> Size:
    """An image size ``[w, h]`` of positive ints."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise RecordError(field, f"expected [w, h], got {v!r}")
    return (integer(field, v[0], minimum=1), integer(field, v[1], minimum=1))


def rect(field: str, v: Any, image_size: Size) -> Box:
    """A box ``[x1, y1, x2, y2]``: finite, with positive area, inside the `image_size` (w, h) image (writers clip
    first)."""
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        raise RecordError(field, f"expected [x1, y1, x2, y2], got {v!r}")
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in v):
        raise RecordError(field, f"box values must be numbers, got {v!r}")
    x1, y1, x2, y2 = (float(c) for c in v)
    if not all(math.isfinite(c) for c in (x1, y1, x2, y2)):
        raise RecordError(field, f"box has non-finite values {v!r}")
    if not (x2 > x1 and y2 > y1):
        raise RecordError(field, f"box has zero or negative area {v!r}")
    w, h = image_size
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise RecordError(field, f"box {v!r} outside the {w}x{h} image")
    return (x1, y1, x2, y2)


def optional_rect(field: str, v: Any, image_size: Size) -> Box | None:
    """`rect`, or None for nil (no box)."""
    return None if v is None else rect(field, v, image_size)


# --- the codec ---------------------------------------------------------------------------------------------------


def encode(schema: Schema, record: Any) -> bytes:
    """Validates and serialises `record` (an instance of ``schema.record_type``)."""
    if not isinstance(record, schema.record_type):
        raise TypeError(f"expected {schema.record_type.__name__}, got {type(record).__name__}")
    fields = dataclasses.asdict(record)
    schema.validate(fields)  # the same checks as on decode: never write what could not be read back
    out: dict[str, Any] = {"version": schema.version, "kind": schema.kind}
    for k, v in fields.items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return msgpack.packb(out, use_bin_type=True)


def _unpack(data: bytes) -> dict:
    try:
        m = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise RecordError(None, f"not a msgpack record: {e}") from e
    if not isinstance(m, dict):
        raise RecordError(None, f"expected a map, got {type(m).__name__}")
    return m


def _validate(schema: Schema, m: dict) -> Any:
    if m.get("version") != schema.version:
        raise RecordError("version", f"expected {schema.version}, got {m.get('version')!r}")
    if m.get("kind") != schema.kind:
        raise RecordError("kind", f"expected {schema.kind!r}, got {m.get('kind')!r}")
    expected = {f.name for f in dataclasses.fields(schema.record_type)}
    present = set(m) - set(HEADER)
    if missing := sorted(expected - present):
        raise RecordError(missing[0], "missing")
    if unknown := sorted(present - expected):
        raise RecordError(unknown[0], f"unknown field for schema version {schema.version}")
    return schema.validate(m)


def decode(schema: Schema, data: bytes) -> Any:
    """Parses and validates one record of `schema`; raises `RecordError` naming the bad field."""
    return _validate(schema, _unpack(data))


def decode_any(schemas: Sequence[Schema], data: bytes) -> Any:
    """Decodes a record of any of `schemas`, dispatching on its ``kind`` field."""
    m = _unpack(data)
    by_kind = {s.kind: s for s in schemas}
    if m.get("kind") not in by_kind:
        raise RecordError("kind", f"unknown record kind {m.get('kind')!r}")
    return _validate(by_kind[m["kind"]], m)


# --- shards ------------------------------------------------------------------------------------------------------


def shard_paths(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expands a glob (or passes a list through) into shard paths in sorted order.

    Sorted order matters: keys stored in records (e.g. OACIRR gallery indices) are global keys over the shards
    concatenated in shard-number order, which is what the zero-padded names sort into.
    """
    if isinstance(pattern, (str, os.PathLike)):
        paths = sorted(glob.glob(os.fspath(pattern)))
        if not paths:
            raise FileNotFoundError(f"no shard matches {os.fspath(pattern)!r}")
        return paths
    return [os.fspath(p) for p in pattern]


def read_shards(pattern: str | os.PathLike | Sequence[str | os.PathLike], decode_record: Callable[[bytes], T]
                ) -> list[T]:
    """Reads every record of the matching ArrayRecord shards, in global key order, through `decode_record`.

    Uses array_record's `ArrayRecordDataSource` (the class Grain's `ArrayRecordDataSource` extends), so the keys
    seen here are the keys a Grain pipeline over the same shard list sees. Meant for tests, evaluation sets and
    small splits: it holds every record (with its image bytes) in memory.
    """
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    paths = shard_paths(pattern)
    with ArrayRecordDataSource(paths) as source:
        n = len(source)
        raw = source.__getitems__(range(n)) if n else []
    return [decode_record(r) for r in raw]
