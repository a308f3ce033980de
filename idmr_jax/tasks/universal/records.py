"""Record schema of any-modality retrieval examples: one schema for M-BEIR now and the universal training pipeline.

Written by `idmr_jax.tasks.universal.mbeir_convert` (CLI ``python -m data_prep.mbeir``), read by the evaluation and
the universal input pipeline. Every record goes through the shared codec (`idmr_jax.data.records`): one msgpack map
with ``version`` (== `SCHEMA_VERSION`) and ``kind`` first. Two kinds:

Query record (``kind == "query"``, ``queries-*.array_record``):

    qid             str           the query's id (M-BEIR: "<dataset_id>:<n>")
    text            str | nil     the query text (no instruction prepended); nil when the modality has no text
    image           bytes | nil   the query image file's bytes; nil when the modality has no image
    modality        str           "text" | "image" | "image,text": exactly which of text and image are present
    instruction_set [str]         the non-empty instructions UniIR would draw one from ([] = none known); the
                                  evaluation picks one per query, fixed (`idmr_jax.tasks.universal.mbeir`)
    task_id         int           the task (M-BEIR: 0 t->i, 1 t->t, 2 t->(i,t), 3 i->t, 4 i->i, 6, 7, 8)
    dataset_id      int           the source dataset (M-BEIR: 0 VisualNews ... 9 MSCOCO)
    positives       [str]         dids of the relevant candidates (M-BEIR: the qrels positives)
    negatives       [str]         dids of hard-negative candidates ([] when none)
    source_index    int           the query's position in its source file
    extra           str           JSON object: what else the release says (never read by a model)

Candidate record (``kind == "candidate"``, ``candidates-*.array_record``):

    did             str           the candidate's id (M-BEIR: "<dataset_id>:<n>")
    text, image, modality          as for a query
    source_index    int           its position in its source file
    extra           str           JSON object (M-BEIR: the pools it belongs to, src_content)

Training pair (``kind == "pair"``, ``train-*.array_record``): one query with its positive and its hard negatives
carried along (`idmr_jax.tasks.universal.pipeline` reads them; the converters of M-BEIR's train split and of
InstructCIR's caption pairs and instruction triplets write them):

    pair_id         str           unique id of the example (M-BEIR: the qid; InstructCIR: "<source>:<n>")
    query           map           a side: ``{id, text, image, modality}`` as above (``id`` = the query's id)
    instruction_set [str]         instructions to draw one from per example ([] = none)
    task_id, dataset_id  int      as for a query (0 where the source has no such ids)
    positive        map           the positive candidate (a side; ``id`` = its did)
    negatives       [map]         hard-negative candidates (sides), each a negative of this query only
    source_index    int           its position in its source file
    extra           str           JSON object

`decode_*` validate every field and raise `RecordError` naming the offending one; `encode_*` run the same checks.
A change of the field set or of a field's meaning needs a bump of `SCHEMA_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from idmr_jax.data import records as codec
from idmr_jax.data.records import RecordError, integer, json_object_text, nonempty_bytes, text, text_list

SCHEMA_VERSION = 1
QUERY_KIND = "query"
CANDIDATE_KIND = "candidate"
PAIR_KIND = "pair"
# Modality strings as M-BEIR writes them; each names which of (text, image) is present.
MODALITIES = {"text": (True, False), "image": (False, True), "image,text": (True, True)}

__all__ = ["CANDIDATE_KIND", "MODALITIES", "PAIR_KIND", "QUERY_KIND", "SCHEMA_VERSION", "CandidateRecord",
           "QueryRecord", "RecordError", "Side", "TrainingPair", "decode_any", "decode_candidate", "decode_pair",
           "decode_query", "encode_candidate", "encode_pair", "encode_query", "modality_of", "read_candidates",
           "read_pairs", "read_queries"]


def modality_of(has_text: bool, has_image: bool) -> str:
    """The modality string of a side with (or without) text and image; ValueError for neither."""
    for name, present in MODALITIES.items():
        if present == (has_text, has_image):
            return name
    raise ValueError("a query or candidate needs text, an image or both")


class ExtraFields:
    """``extra_fields``: a record's ``extra`` JSON object, parsed (shared by every kind that carries ``extra``)."""

    extra: str

    @property
    def extra_fields(self) -> dict:
        """`extra` parsed."""
        return json.loads(self.extra)


@dataclasses.dataclass(frozen=True)
class QueryRecord(ExtraFields):
    """One query of any modality; see the module docstring."""

    qid: str
    text: str | None
    image: bytes | None
    modality: str
    instruction_set: tuple[str, ...]
    task_id: int
    dataset_id: int
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    source_index: int
    extra: str


@dataclasses.dataclass(frozen=True)
class CandidateRecord(ExtraFields):
    """One candidate of any modality; see the module docstring."""

    did: str
    text: str | None
    image: bytes | None
    modality: str
    source_index: int
    extra: str


@dataclasses.dataclass(frozen=True)
class Side:
    """One side of a training pair: a query, its positive or a hard negative, of any modality."""

    id: str
    text: str | None
    image: bytes | None
    modality: str


@dataclasses.dataclass(frozen=True)
class TrainingPair(ExtraFields):
    """A query, its positive and its hard negatives; see the module docstring."""

    pair_id: str
    query: Side
    instruction_set: tuple[str, ...]
    task_id: int
    dataset_id: int
    positive: Side
    negatives: tuple[Side, ...]
    source_index: int
    extra: str


def _sides(m: Mapping[str, Any]) -> tuple[str | None, bytes | None, str]:
    """(text, image, modality), checked against each other: the modality says exactly which are present."""
    modality = m["modality"]
    if modality not in MODALITIES:
        raise RecordError("modality", f"expected one of {sorted(MODALITIES)}, got {modality!r}")
    wants_text, wants_image = MODALITIES[modality]
    if wants_text:
        txt = text("text", m["text"])
    elif m["text"] is not None:
        raise RecordError("text", f"must be nil for modality {modality!r}")
    else:
        txt = None
    if wants_image:
        image = nonempty_bytes("image", m["image"])
    elif m["image"] is not None:
        raise RecordError("image", f"must be nil for modality {modality!r}")
    else:
        image = None
    return txt, image, modality


def _query(m: Mapping[str, Any]) -> QueryRecord:
    txt, image, modality = _sides(m)
    return QueryRecord(qid=text("qid", m["qid"]), text=txt, image=image, modality=modality,
                       instruction_set=text_list("instruction_set", m["instruction_set"]),
                       task_id=integer("task_id", m["task_id"]), dataset_id=integer("dataset_id", m["dataset_id"]),
                       positives=text_list("positives", m["positives"]),
                       negatives=text_list("negatives", m["negatives"]),
                       source_index=integer("source_index", m["source_index"]),
                       extra=json_object_text("extra", m["extra"]))


def _candidate(m: Mapping[str, Any]) -> CandidateRecord:
    txt, image, modality = _sides(m)
    return CandidateRecord(did=text("did", m["did"]), text=txt, image=image, modality=modality,
                           source_index=integer("source_index", m["source_index"]),
                           extra=json_object_text("extra", m["extra"]))


def _side(field: str, m: Any) -> Side:
    """A side map, its errors named ``field.<key>`` (e.g. ``negatives[2].image``)."""
    if not isinstance(m, Mapping):
        raise RecordError(field, f"expected a map with id, text, image, modality, got {type(m).__name__}")
    if missing := sorted({"id", "text", "image", "modality"} - set(m)):
        raise RecordError(f"{field}.{missing[0]}", "missing")
    try:
        txt, image, modality = _sides(m)
    except RecordError as e:
        raise RecordError(f"{field}.{e.field}", str(e).split(": ", 1)[-1]) from None
    return Side(id=text(f"{field}.id", m["id"]), text=txt, image=image, modality=modality)


def _pair(m: Mapping[str, Any]) -> TrainingPair:
    negatives = m["negatives"]
    if not isinstance(negatives, (list, tuple)):
        raise RecordError("negatives", f"expected a list of sides, got {type(negatives).__name__}")
    return TrainingPair(pair_id=text("pair_id", m["pair_id"]), query=_side("query", m["query"]),
                        instruction_set=text_list("instruction_set", m["instruction_set"]),
                        task_id=integer("task_id", m["task_id"]), dataset_id=integer("dataset_id", m["dataset_id"]),
                        positive=_side("positive", m["positive"]),
                        negatives=tuple(_side(f"negatives[{i}]", n) for i, n in enumerate(negatives)),
                        source_index=integer("source_index", m["source_index"]),
                        extra=json_object_text("extra", m["extra"]))


QUERY_SCHEMA = codec.Schema(QUERY_KIND, SCHEMA_VERSION, QueryRecord, _query)
CANDIDATE_SCHEMA = codec.Schema(CANDIDATE_KIND, SCHEMA_VERSION, CandidateRecord, _candidate)
PAIR_SCHEMA = codec.Schema(PAIR_KIND, SCHEMA_VERSION, TrainingPair, _pair)


def encode_query(record: QueryRecord) -> bytes:
    """Validates and serialises a query record."""
    return codec.encode(QUERY_SCHEMA, record)


def encode_candidate(record: CandidateRecord) -> bytes:
    """Validates and serialises a candidate record."""
    return codec.encode(CANDIDATE_SCHEMA, record)


def encode_pair(record: TrainingPair) -> bytes:
    """Validates and serialises a training pair."""
    return codec.encode(PAIR_SCHEMA, record)


def decode_pair(data: bytes) -> TrainingPair:
    """Parses and validates one training pair; `RecordError` names the bad field (``negatives[1].text``)."""
    return codec.decode(PAIR_SCHEMA, data)


def decode_query(data: bytes) -> QueryRecord:
    """Parses and validates one query record; `RecordError` names the bad field."""
    return codec.decode(QUERY_SCHEMA, data)


def decode_candidate(data: bytes) -> CandidateRecord:
    """Parses and validates one candidate record; `RecordError` names the bad field."""
    return codec.decode(CANDIDATE_SCHEMA, data)


def decode_any(data: bytes) -> QueryRecord | CandidateRecord | TrainingPair:
    """A query, candidate or training-pair record, by its ``kind``."""
    return codec.decode_any((QUERY_SCHEMA, CANDIDATE_SCHEMA, PAIR_SCHEMA), data)


def read_queries(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[QueryRecord]:
    """Every query record of the matching shards, in global key order."""
    return codec.read_shards(pattern, decode_query)


def read_candidates(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[CandidateRecord]:
    """Every candidate record of the matching shards, in global key order."""
    return codec.read_shards(pattern, decode_candidate)


def read_pairs(pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[TrainingPair]:
    """Every training pair of the matching shards, in global key order."""
    return codec.read_shards(pattern, decode_pair)
