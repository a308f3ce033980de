"""Converted M-BEIR shards -> ArrayRecord shards of universal training pairs, with a manifest.

    python -m data_prep.mbeir_pairs --shards DIR --out DIR [--strict] [--shard-size N] [--workers N] [--overwrite]

``--shards`` is a folder written by ``python -m data_prep.mbeir`` (`idmr_jax.tasks.universal.mbeir_convert`),
typically ``--split train --pool global``: ``queries-*``, ``candidates-*`` and its ``manifest.json``, which names
the shards and their sha256 (taken from there, not recomputed; each shard's size is checked against it).

One pair (`records.TrainingPair`) per query, in query order: ``pair_id`` and the query side's ``id`` are the
qid; the query side is the query's text, image and modality; ``instruction_set``, ``task_id``, ``dataset_id`` and
``source_index`` are the query's; the positive is the query's FIRST positive candidate (UniIR trains on one
positive per query); the negatives are the query's ``negatives`` resolved to candidate sides, in the query's order.
``extra`` is the query's ``extra`` (its M-BEIR ``key``, ``pool``, source content) plus ``other_positives`` (the
dids of its other positives) and ``query_shard_key`` (its global key in the ``queries-*`` shards).

Skips (`idmr_jax.data.shards.Skip`, in ``skipped``; file = the query shard, index = the record in it, name = qid):

- the first positive is not among the candidates: ``unknown_name``, field ``positives[0]`` (a query with no
  positive at all: ``missing_field``, field ``positives``); the query is skipped;
- a negative not among the candidates: ``unknown_name``; one that is one of the query's positives: ``is_positive``;
  one listed twice: ``duplicate_name``; field ``negatives[i]``, dropped from the pair (``entry_ignored``).

``strict`` turns any skip into a `ConversionError` listing each one. A record of the input shards that does not
decode is a `ConversionError` naming the shard, the record and the field.

Scale (M-BEIR train: 1.1M queries, a 5.6M-candidate union pool with image bytes): candidate records are never held
together. One streaming pass decodes each candidate once and keeps only its did, in a `CandidateIndex` (did ->
global key: sorted did bytes plus an int64 key, about ``len(did) + 8`` bytes per candidate, ~100 MB for 5.6M). One
streaming pass over the queries keeps, per pair, a tuple of keys (query, positive, negatives: ~100 bytes) and the
skips. The shard writers then fetch each pair's query and candidates by key (`idmr_jax.data.grain_io.RecordReader`),
one pair at a time.

Output in ``out``: ``train-IIIII-of-NNNNN.array_record`` and ``manifest.json`` (the conventions of
`idmr_jax.tasks.universal.mbeir_convert`: counts, per-shard records and sha256, the input shards' sha256 from their
manifest, the arguments, ``skipped``; no timestamps). Finished shards are reused when rerun on the same inputs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from idmr_jax.data.grain_io import RecordReader
from idmr_jax.data.shards import (WRITER_OPTIONS, ConversionError, ShardPlan, Skip, check_manifest_owner,
                                  json_digest, open_shard_state, process_pool, report_skips, shard_name,
                                  split_contiguous, write_json_atomic, write_shards)
from idmr_jax.tasks.universal import mbeir, mbeir_convert, records

TOOL_NAME = "data_prep.mbeir_pairs"
TOOL_VERSION = 1
MANIFEST = "manifest.json"
RECORDS_PER_SHARD = 1000
READ_BATCH = 256  # records read from a shard at a time in the streaming passes

__all__ = ["MANIFEST", "RECORDS_PER_SHARD", "TOOL_NAME", "CandidateIndex", "ConversionError", "ConvertedShards",
           "build_candidate_index", "convert_pairs", "read_converted"]


@dataclasses.dataclass(frozen=True)
class ConvertedShards:
    """A folder of converted M-BEIR shards: the shard paths in global key order, their sha256 by file name (from
    its manifest), and the manifest itself."""

    folder: str
    queries: list[str]
    candidates: list[str]
    sha256: dict[str, str]
    manifest: dict


def read_converted(folder: str) -> ConvertedShards:
    """The shards listed by `folder`'s manifest (written by ``data_prep.mbeir``); a `ConversionError` naming the
    folder when the manifest is missing, another tool's, or lists a shard that is absent or of another size."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, mbeir_convert.MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable manifest of converted M-BEIR shards: {e}") from e
    tool = manifest.get("tool") if isinstance(manifest, dict) else None
    if not isinstance(tool, dict) or tool.get("name") != mbeir_convert.TOOL_NAME:
        raise ConversionError(f"{path}: not written by {mbeir_convert.TOOL_NAME} (python -m data_prep.mbeir)")
    listed, sha256 = {}, {}
    for kind in ("queries", "candidates"):
        entries = manifest.get("shards", {}).get(kind)
        if not isinstance(entries, list) or not entries:
            raise ConversionError(f"{path}: field 'shards.{kind}': expected a non-empty list of shards")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"file", "bytes", "sha256"} <= set(entry):
                raise ConversionError(f"{path}: field 'shards.{kind}[{i}]': expected file, bytes and sha256")
            file = os.path.join(folder, entry["file"])
            if not os.path.isfile(file) or os.path.getsize(file) != entry["bytes"]:
                raise ConversionError(f"{file}: missing or not the {entry['bytes']} bytes its manifest records; "
                                      "reconvert with python -m data_prep.mbeir")
            sha256[entry["file"]] = entry["sha256"]
        # Shard names sort in shard order: the global keys (and RecordReader's) count over them in this order.
        listed[kind] = sorted(os.path.join(folder, e["file"]) for e in entries)
    return ConvertedShards(folder, listed["queries"], listed["candidates"], sha256, manifest)


def _stream(paths: Sequence[str], decode: Callable[[bytes], Any]) -> Iterator[tuple[str, int, int, Any]]:
    """(shard file name, index in the shard, global key, decoded record) of every record of `paths` in order, one
    shard open at a time; a record that does not decode is a `ConversionError` naming shard, record and field."""
    key = 0
    for path in paths:
        file = os.path.basename(path)
        reader = ArrayRecordReader(path)
        try:
            n = reader.num_records()
            for start in range(0, n, READ_BATCH):
                for index, data in enumerate(reader.read(start, min(start + READ_BATCH, n)), start):
                    try:
                        record = decode(data)
                    except records.RecordError as e:
                        raise ConversionError(f"{file}: record {index}: {e}") from e
                    yield file, index, key, record
                    key += 1
        finally:
            reader.close()


class CandidateIndex:
    """did -> global key of the candidate shards, held as two NumPy arrays (the dids' UTF-8 bytes, sorted, and their
    keys): about ``len(did) + 8`` bytes per candidate instead of a dict's ~150."""

    def __init__(self, dids: np.ndarray, keys: np.ndarray):
        order = np.argsort(dids, kind="stable")
        self.dids, self.keys = dids[order], keys[order]

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, did: str) -> int | None:
        """The global key of candidate `did`, or None when no candidate has it."""
        needle = did.encode("utf-8")
        i = int(np.searchsorted(self.dids, needle))
        return int(self.keys[i]) if i < len(self.dids) and self.dids[i] == needle else None


def build_candidate_index(paths: Sequence[str]) -> CandidateIndex:
    """One streaming pass over the candidate shards `paths` (each record decoded once) -> `CandidateIndex`; a
    `ConversionError` naming both records when a did occurs twice."""
    chunks, dids = [], []
    for file, index, _, c in _stream(paths, records.decode_candidate):
        if "\0" in c.did:  # NumPy's bytes dtype drops trailing NULs: such a did could not be told apart
            raise ConversionError(f"{file}: record {index}: field 'did': contains a NUL character")
        dids.append(c.did.encode("utf-8"))
        if len(dids) == 1 << 16:  # NumPy chunks, not a list of millions of str objects
            chunks.append(np.array(dids, dtype=np.bytes_))
            dids = []
    chunks.append(np.array(dids, dtype=np.bytes_))
    all_dids = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    index = CandidateIndex(all_dids, np.arange(len(all_dids), dtype=np.int64))
    repeats = np.flatnonzero(index.dids[1:] == index.dids[:-1])
    if len(repeats):
        first, second = sorted(int(index.keys[i]) for i in (repeats[0], repeats[0] + 1))
        raise ConversionError(f"candidate did {index.dids[repeats[0]].decode()!r} occurs twice: global keys {first} "
                              f"and {second} of the candidate shards")
    return index


def _plan_pair(file: str, index: int, key: int, q: records.QueryRecord, cands: CandidateIndex
               ) -> tuple[tuple[int, ...] | None, list[Skip]]:
    """One query -> (its keys: query, positive, negatives, or None when skipped; its skips). See the docstring."""
    if not q.positives:
        return None, [Skip(file, index, q.qid, "positives", "missing_field", "no positive candidate",
                           "record_skipped")]
    positive = cands.key(q.positives[0])
    if positive is None:
        return None, [Skip(file, index, q.qid, "positives[0]", "unknown_name",
                           f"positive {q.positives[0]!r} is not among the candidates", "record_skipped")]
    negatives, skips, seen = [], [], set()
    for i, did in enumerate(q.negatives):
        neg = cands.key(did)
        if neg is None:
            problem = "unknown_name", f"negative {did!r} is not among the candidates"
        elif did in q.positives:
            problem = "is_positive", f"negative {did!r} is also a positive of the query"
        elif did in seen:
            problem = "duplicate_name", f"negative {did!r} is listed twice"
        else:
            negatives.append(neg)
            seen.add(did)
            continue
        skips.append(Skip(file, index, q.qid, f"negatives[{i}]", *problem, "entry_ignored"))
    return (key, positive, *negatives), skips


def _side(reader: RecordReader, key: int) -> records.Side:
    c = records.decode_candidate(reader.raw(key))
    return records.Side(id=c.did, text=c.text, image=c.image, modality=c.modality)


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded training pairs of one shard."""
    queries, candidates = RecordReader(task["read"]["queries"]), RecordReader(task["read"]["candidates"])
    for query_key, positive_key, *negative_keys in task["items"]:
        q = records.decode_query(queries.raw(query_key))
        positive, negatives = _side(candidates, positive_key), tuple(_side(candidates, k) for k in negative_keys)
        # The keys were planned from these shards; a mismatch means they changed underneath this run.
        if positive.id != q.positives[0] or any(n.id not in q.negatives for n in negatives):
            raise ConversionError(f"query {q.qid!r} (key {query_key}): the shards changed since they were indexed")
        extra = {**json.loads(q.extra), "other_positives": list(q.positives[1:]), "query_shard_key": query_key}
        yield records.encode_pair(records.TrainingPair(
            pair_id=q.qid, query=records.Side(id=q.qid, text=q.text, image=q.image, modality=q.modality),
            instruction_set=q.instruction_set, task_id=q.task_id, dataset_id=q.dataset_id, positive=positive,
            negatives=negatives, source_index=q.source_index, extra=json.dumps(extra, sort_keys=True)))


def _plans(items: list[tuple[int, ...]], inputs: ConvertedShards, shard_size: int) -> list[ShardPlan]:
    num = max(1, math.ceil(len(items) / shard_size))
    inputs_digest = json_digest(inputs.sha256)  # any change of an input shard redoes every output shard
    read = {"queries": inputs.queries, "candidates": inputs.candidates}
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"items": items[start:stop]}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              "inputs": inputs_digest, **task})
        plans.append(ShardPlan(shard_name("train", i, num), digest, {**task, "read": read}))
    return plans


def convert_pairs(shards: str, out: str, *, strict: bool = False, shard_size: int = RECORDS_PER_SHARD,
                  workers: int = 1, overwrite: bool = False) -> dict:
    """Converts the converted M-BEIR shards in `shards` to training pairs in `out` (module docstring); returns the
    manifest written."""
    if shard_size < 1:
        raise ConversionError(f"shard_size must be >= 1, got {shard_size}")
    inputs = read_converted(shards)
    out = os.path.abspath(out)
    if out == inputs.folder:
        raise ConversionError(f"{out}: write the pairs to another folder than the converted shards")
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    cands = build_candidate_index(inputs.candidates)
    items, skips, num_queries, by_key = [], [], 0, {}
    for file, index, key, q in _stream(inputs.queries, records.decode_query):
        num_queries += 1
        item, query_skips = _plan_pair(file, index, key, q, cands)
        skips += query_skips
        if item is not None:
            items.append(item)
            name = q.extra_fields.get("key", "")
            by_key[name] = by_key.get(name, 0) + 1
    report_skips(skips, strict=strict)
    if not items:
        raise ConversionError(f"{inputs.folder}: no query has its positive among the candidates")
    split, pool = inputs.manifest.get("split"), inputs.manifest.get("args", {}).get("pool")
    os.makedirs(out, exist_ok=True)
    state = open_shard_state(out, {"tool": TOOL_NAME, "split": split, "pool": pool})
    plans = _plans(items, inputs, shard_size)
    with process_pool(workers) as procs:
        infos, written, reused = write_shards(out, plans, _produce, state, pool=procs)
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "dataset": mbeir.NAME,
        "split": split,
        "args": {"shards": inputs.folder, "strict": strict, "shard_size": shard_size},
        "input": {"split": split, "pool": pool, "keys": inputs.manifest.get("args", {}).get("keys")},
        "sources": inputs.sha256,
        "counts": {"pairs": len(items), "queries": num_queries, "candidates": len(cands),
                   "hard_negatives": sum(len(item) - 2 for item in items), "skipped": len(skips),
                   "pairs_by_key": by_key},
        "shards": {"train": [dataclasses.asdict(i) for i in infos]},
        "skipped": [dataclasses.asdict(s) for s in skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("mbeir pairs (%s, %s pool): %d pairs of %d queries, %d skipped; wrote %d shards, reused %d", split,
                 pool, len(items), num_queries, len(skips), len(written), len(reused))
    return manifest
