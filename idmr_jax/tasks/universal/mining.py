"""MM-Embed's modality-aware hard-negative mining: training pairs -> the same pairs with negatives mined from the
retriever's own top-k (CLI: ``python -m idmr_jax.mine``, `idmr_jax.mine`).

The rule (`choose_negatives`), per training pair, over the top-k of its query in a search index
(`idmr_jax.search.store`, ranks from 0, ties broken by index row, so everything is deterministic; nothing is
sampled):

- never mined: the pair's positive, the dids in its ``extra["other_positives"]`` and ``extra["instance_positives"]``,
  and any candidate whose ``extra["instance"]`` equals the pair's ``extra["instance"]`` (when both carry one);
- only candidates of the target modality (the positive's modality) are kept: a higher-ranked candidate of another
  modality is passed over. Without this a retriever biased towards, say, text candidates for an image task would
  mine text negatives the task never retrieves (MM-Embed's modality bias);
- "above": kept candidates ranked above the positive, hardest first, at most ``num_above``; when the positive is
  not in the top k, every kept candidate is above it;
- "near": kept candidates ranked below the positive by at most ``window`` ranks (ranks p+1 ... p+window), closest
  first, at most ``num_near``: near misses.

`mine_shards` writes the pairs again in the layout of their input (the same shards, the same records in the same
order, so a pair keeps its global key), each with its mined negatives first, then (``negatives="append"``) its own
negatives that were not mined, or (``"replace"``) only the mined ones (a pair with nothing mined keeps its own).
``extra["mined_negatives"]`` counts the mined ones. The trainer reads them as any pair's negatives
(`idmr_jax.tasks.universal.pipeline.PairExample`): no trainer change. Mined candidates are read from the index's
candidate shards by key (index row = global key of ``candidates-*``), a few per pair: the pool is never read whole.

Output in ``out``: ``train-IIIII-of-NNNNN.array_record``, ``mined.jsonl`` (one line per pair, in key order: its
key, pair_id, positive_rank (null when outside the top k), the above and near dids, the candidates dropped as the
same instance) and ``manifest.json`` (the checkpoint that built the index, k, the rule and its options, counts with
a histogram of negatives mined per pair, shards, ``skipped``; no timestamps). Skips
(`idmr_jax.data.shards.Skip`): a pair whose positive is not in the index (``unknown_name``, field ``positive.id``)
cannot be ranked against: it is written with its own negatives, nothing mined (``not_mined``). ``strict`` turns a
skip into a `ConversionError` listing them. Finished shards are reused when rerun on the same inputs.

The index must hold the pairs' positives: M-BEIR's pairs are mined from their union pool; pairs whose candidates
exist only inside the pairs (InstructCIR's captions, the universal demo) from the pool `write_pair_pool` writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from idmr_jax.data.grain_io import RecordReader, list_shards
from idmr_jax.data.shards import (WRITER_OPTIONS, ConversionError, ShardPlan, Skip, check_manifest_owner,
                                  file_sha256, json_digest, open_shard_state, report_skips, shard_name,
                                  split_contiguous, write_json_atomic, write_shards)
from idmr_jax.search import store
from idmr_jax.tasks.universal import records

TOOL_NAME = "idmr_jax.mine"
TOOL_VERSION = 1
MANIFEST = "manifest.json"
PER_PAIR = "mined.jsonl"
TRAIN_GLOB = "train-*.array_record"
CANDIDATE_GLOB = "candidates-*.array_record"
RULE_NAME = "mm-embed-modality"
MODES = ("replace", "append")
SEARCH_BLOCK = 4096  # queries searched at a time: bounds the score blocks, not the result
POOL_TOOL = "idmr_jax.mine.pool"
POOL_SHARD_SIZE = 1000

__all__ = ["MANIFEST", "MODES", "PER_PAIR", "TOOL_NAME", "Choice", "MiningRule", "candidate_paths",
           "choose_negatives", "mine_negatives", "mine_shards", "never_mined", "write_pair_pool"]


@dataclasses.dataclass(frozen=True)
class MiningRule:
    """The rule's options (module docstring): top `k` searched, at most `num_above` negatives above the positive
    and `num_near` within `window` ranks below it; `negatives` "replace" or "append" (to the pair's own)."""

    k: int = 50
    num_above: int = 2
    num_near: int = 2
    window: int = 10
    negatives: str = "replace"

    def __post_init__(self):
        for name in ("k", "num_above", "num_near", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "k" else 0):
                raise ValueError(f"mining option {name} = {value!r}: expected an integer >= {int(name == 'k')}")
        if self.negatives not in MODES:
            raise ValueError(f"mining option negatives = {self.negatives!r}: use one of {MODES}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the rule chose for one query: the dids above the positive and the near misses (each in rank order),
    the positive's rank (None when outside the list) and how many candidates of another modality ranked above it."""

    above: tuple[str, ...]
    near: tuple[str, ...]
    positive_rank: int | None
    other_modality_above: int

    @property
    def dids(self) -> list[str]:
        """The chosen negatives, hardest first."""
        return [*self.above, *self.near]


def choose_negatives(ranked_dids: Sequence[str], ranked_modalities: Sequence[str], *, positive: str,
                     positives: set[str] | frozenset[str], target_modality: str, num_above: int, num_near: int,
                     window: int) -> Choice:
    """MM-Embed's modality rule over one query's ranked candidates (best first); see the module docstring.
    `positive` is the pair's positive, whose rank splits "above" from "near"; `positives` are every did never to
    mine (the positive is never mined either way)."""
    if len(ranked_dids) != len(ranked_modalities):
        raise ValueError(f"{len(ranked_dids)} ranked dids but {len(ranked_modalities)} modalities")
    ranks = [r for r, did in enumerate(ranked_dids) if did == positive]
    p = ranks[0] if ranks else None
    stop = len(ranked_dids) if p is None else p
    excluded = {positive, *positives}

    def kept(rank_range) -> list[str]:
        return [ranked_dids[r] for r in rank_range
                if ranked_modalities[r] == target_modality and ranked_dids[r] not in excluded]

    above = kept(range(stop))[:num_above]
    near = [] if p is None else kept(range(p + 1, min(len(ranked_dids), p + 1 + window)))[:num_near]
    other = sum(ranked_modalities[r] != target_modality for r in range(stop))
    return Choice(tuple(above), tuple(near), p, other)


def mine_negatives(ranked_dids: Sequence[str], ranked_modalities: Sequence[str], *, positive: str,
                   positives: set[str] | frozenset[str], target_modality: str, num_above: int, num_near: int,
                   window: int) -> list[str]:
    """The negative dids `choose_negatives` picks, hardest first: above the positive, then the near misses."""
    return choose_negatives(ranked_dids, ranked_modalities, positive=positive, positives=positives,
                            target_modality=target_modality, num_above=num_above, num_near=num_near,
                            window=window).dids


def never_mined(pair: records.TrainingPair, where: str) -> tuple[set[str], str | None]:
    """(dids the data marks as positives of `pair`: its positive, ``other_positives``, ``instance_positives``; its
    ``extra["instance"]`` or None). A `ConversionError` naming `where` and the field when one is malformed."""
    extra = json.loads(pair.extra)
    out = {pair.positive.id}
    for field in ("other_positives", "instance_positives"):
        value = extra.get(field, [])
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise ConversionError(f"{where}, field 'extra.{field}': expected a list of dids, got {value!r}")
        out.update(value)
    instance = extra.get("instance")
    if instance is not None and not isinstance(instance, (str, int)):
        raise ConversionError(f"{where}, field 'extra.instance': expected a string or integer, got {instance!r}")
    return out, None if instance is None else str(instance)


def candidate_paths(index: store.SearchIndex, candidates: str | None = None) -> list[str]:
    """The ``candidates-*`` shards the index rows point into: `candidates` (a folder) when given, else the folder
    the index's ``meta["source"]`` names (``{"kind": "shards", "path": FOLDER}``, written by ``python -m
    idmr_jax.search index``). A `ConversionError` when there is none or it holds another number of candidates."""
    if candidates is None:
        source = index.meta.get("source") or {}
        candidates = source.get("path") if isinstance(source, dict) and source.get("kind") == "shards" else None
        if not isinstance(candidates, str) or not candidates:
            raise ConversionError(f"{index.path}: index.json's 'source' names no candidate folder ({source!r}); "
                                  "give the folder of its candidate shards (--candidates)")
    paths = list_shards(candidates, CANDIDATE_GLOB)
    total = sum(_num_records(p) for p in paths)
    if total != len(index):
        raise ConversionError(f"{candidates}: {total} candidates, but the index {index.path} holds {len(index)}: "
                              "not the shards it was built from")
    return paths


def _num_records(path: str) -> int:
    reader = ArrayRecordReader(path)
    try:
        return reader.num_records()
    finally:
        reader.close()


class _Candidates:
    """Candidate records read by index row (= global key), each checked against the did the index holds for it."""

    def __init__(self, paths: list[str]):
        self.reader, self.folder = RecordReader(paths), os.path.dirname(paths[0])

    def read(self, row: int, did: str) -> records.CandidateRecord:
        try:
            c = records.decode_candidate(self.reader.raw(row))
        except records.RecordError as e:
            raise ConversionError(f"{self.folder}/{CANDIDATE_GLOB}: record {row} (global key): {e}") from e
        if c.did != did:
            raise ConversionError(f"{self.folder}/{CANDIDATE_GLOB}: record {row} is {c.did!r}, the index says "
                                  f"{did!r}: the candidate shards changed since they were indexed")
        return c


def _choose_for_pair(pair: records.TrainingPair, where: str, rows: np.ndarray, index: store.SearchIndex,
                     candidates: _Candidates, rule: MiningRule) -> tuple[Choice, list[str]]:
    """The rule for one pair, its same-instance candidates found by reading only the chosen ones: a chosen
    candidate of the pair's instance is excluded and the rule rerun. Exact, because excluding a candidate that was
    not chosen changes nothing (the positive's rank is the pair's positive's, fixed)."""
    dids = [index.dids[r] for r in rows]
    modalities = [index.modalities[r] for r in rows]
    row_of = dict(zip(dids, (int(r) for r in rows)))
    excluded, instance = never_mined(pair, where)
    same_instance: list[str] = []
    while True:
        choice = choose_negatives(dids, modalities, positive=pair.positive.id, positives=excluded,
                                  target_modality=pair.positive.modality, num_above=rule.num_above,
                                  num_near=rule.num_near, window=rule.window)
        if instance is None:
            return choice, same_instance
        found = [d for d in choice.dids if _instance(candidates.read(row_of[d], d)) == instance]
        if not found:
            return choice, same_instance
        same_instance += found
        excluded |= set(found)


def _instance(c: records.CandidateRecord) -> str | None:
    value = c.extra_fields.get("instance")
    return None if value is None else str(value)


def _side(c: records.CandidateRecord) -> records.Side:
    return records.Side(id=c.did, text=c.text, image=c.image, modality=c.modality)


def _produce(task: dict) -> list[bytes]:
    """Worker entry point: one output shard's pairs, each with its mined negatives (read by key) attached."""
    pairs = RecordReader(task["read"]["train"])
    candidates = _Candidates(task["read"]["candidates"])
    out = []
    for key, rows, dids in task["items"]:
        pair = records.decode_pair(pairs.raw(key))
        mined = tuple(_side(candidates.read(r, d)) for r, d in zip(rows, dids))  # the dids the rows held when mined
        mined_ids = set(dids)
        # "replace" drops the pair's own negatives, unless nothing was mined for it (nothing replaces them).
        keep_own = task["negatives"] == "append" or not rows
        own = tuple(n for n in pair.negatives if n.id not in mined_ids) if keep_own else ()
        extra = {**json.loads(pair.extra), "mined_negatives": len(mined)}
        out.append(records.encode_pair(dataclasses.replace(pair, negatives=mined + own,
                                                           extra=json.dumps(extra, sort_keys=True))))
    return out


def _train_inputs(train_dir: str) -> tuple[list[str], dict[str, str], list[int]]:
    """(train shard paths in key order, their sha256 by file name (from the folder's manifest when it lists them),
    their record counts)."""
    paths = list_shards(train_dir, TRAIN_GLOB)
    listed = {}
    try:
        with open(os.path.join(train_dir, MANIFEST), encoding="utf-8") as f:
            listed = {e["file"]: e["sha256"] for e in json.load(f)["shards"]["train"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no manifest of a pair writer: hash the shards
    sha = {os.path.basename(p): listed.get(os.path.basename(p)) or file_sha256(p) for p in paths}
    return paths, sha, [_num_records(p) for p in paths]


def _decode_pair(reader: RecordReader, key: int, where: str) -> records.TrainingPair:
    try:
        return records.decode_pair(reader.raw(key))
    except records.RecordError as e:
        raise ConversionError(f"{where}: {e}") from e


def _mine_pairs(paths: list[str], starts: np.ndarray, index: store.SearchIndex, queries: np.ndarray,
                candidates: _Candidates, rule: MiningRule) -> tuple[list[tuple], list[dict], list[Skip]]:
    """Every pair's query searched (`SEARCH_BLOCK` at a time) and its negatives chosen: (items ``(key, rows,
    dids)`` for the shard writer, the per-pair lines of `PER_PAIR`, the skips), in key order."""
    indexed = set(index.dids)
    pairs = RecordReader(paths)
    items, lines, skips = [], [], []
    for block in range(0, len(queries), SEARCH_BLOCK):
        _, top = store.search(index, queries[block:block + SEARCH_BLOCK], rule.k)
        for key, rows in enumerate(top, block):
            shard = int(np.searchsorted(starts, key, side="right")) - 1
            file, at = os.path.basename(paths[shard]), key - int(starts[shard])
            where = f"{os.path.dirname(paths[shard])}/{file}: record {at}"
            pair = _decode_pair(pairs, key, where)
            if pair.positive.id not in indexed:
                skips.append(Skip(file, at, pair.pair_id, "positive.id", "unknown_name",
                                  f"positive {pair.positive.id!r} is not among the index's candidates: it cannot be "
                                  "ranked against", "not_mined"))
                choice, same = Choice((), (), None, 0), []
            else:
                choice, same = _choose_for_pair(pair, where, rows, index, candidates, rule)
            row_of = {index.dids[r]: int(r) for r in rows}
            items.append((key, [row_of[d] for d in choice.dids], choice.dids))
            lines.append({"key": key, "pair_id": pair.pair_id, "positive_rank": choice.positive_rank,
                          "above": list(choice.above), "near": list(choice.near), "same_instance": same,
                          "other_modality_above": choice.other_modality_above})
    return items, lines, skips


def _counts(lines: list[dict], skips: list[Skip]) -> dict:
    """The manifest's counts: totals over the pairs and the histogram of negatives mined per pair."""
    mined = [len(x["above"]) + len(x["near"]) for x in lines]
    return {"pairs": len(lines), "mined_negatives": sum(mined), "pairs_with_mined": sum(m > 0 for m in mined),
            "above": sum(len(x["above"]) for x in lines), "near": sum(len(x["near"]) for x in lines),
            "positive_in_top_k": sum(x["positive_rank"] is not None for x in lines),
            "same_instance_dropped": sum(len(x["same_instance"]) for x in lines),
            "other_modality_above": sum(x["other_modality_above"] for x in lines),
            "mined_per_pair": {str(n): mined.count(n) for n in sorted(set(mined))}, "skipped": len(skips)}


def mine_shards(train_dir: str, index: store.SearchIndex, query_embeddings: np.ndarray, out: str, *,
                rule: MiningRule = MiningRule(), candidates: str | None = None, strict: bool = False,
                overwrite: bool = False, query_model: dict | None = None) -> dict:
    """Mines negatives for every pair of ``train_dir/train-*`` (row i of `query_embeddings` = the query of the
    pair with global key i) from `index` and writes the pairs again to `out` (module docstring); returns the
    manifest. `candidates`: the candidate shards' folder when not the one the index names; `query_model`: what
    embedded the queries, recorded next to the index's checkpoint."""
    train_dir, out = os.path.abspath(train_dir), os.path.abspath(out)
    if out == train_dir:
        raise ConversionError(f"{out}: write the mined pairs to another folder than the training pairs")
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    paths, train_sha, counts = _train_inputs(train_dir)
    queries = np.asarray(query_embeddings, np.float32)
    if queries.shape != (sum(counts), index.embeddings.shape[1]):
        raise ValueError(f"query embeddings {queries.shape}: expected one row of the index's dimension per pair, "
                         f"{(sum(counts), index.embeddings.shape[1])} for {train_dir}")
    cand_paths = candidate_paths(index, candidates)
    starts = np.cumsum([0, *counts])
    items, lines, skips = _mine_pairs(paths, starts, index, queries, _Candidates(cand_paths), rule)
    report_skips(skips, strict=strict)

    os.makedirs(out, exist_ok=True)
    # A shard is rewritten when its pairs, their mined rows, the option or the inputs it is read from change.
    source = {"candidates": {os.path.basename(p): os.path.getsize(p) for p in cand_paths},
              "index": {k: v for k, v in index.meta.items() if k != "blocks_done"}}
    read = {"train": paths, "candidates": cand_paths}
    plans = []
    for i, (start, stop) in enumerate(zip(starts[:-1], starts[1:])):
        task = {"items": items[start:stop], "negatives": rule.negatives}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              "train": train_sha[os.path.basename(paths[i])], "source": source, **task})
        plans.append(ShardPlan(shard_name("train", i, len(paths)), digest, {**task, "read": read}))
    state = open_shard_state(out, {"tool": TOOL_NAME, "train": train_dir, "index": os.path.abspath(index.path)})
    infos, written, reused = write_shards(out, plans, _produce, state)
    _write_lines(os.path.join(out, PER_PAIR), lines)
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "checkpoint": index.meta.get("model"),
        "query_model": query_model,
        "index": {"path": os.path.abspath(index.path), "num_candidates": len(index), "dim": index.meta.get("dim"),
                  "source": index.meta.get("source"), "candidates": os.path.dirname(cand_paths[0])},
        "args": {"train": train_dir, "candidates": candidates and os.path.abspath(candidates), "strict": strict,
                 **dataclasses.asdict(rule)},
        "rule": {"name": RULE_NAME, "target_modality": "the positive's modality", **dataclasses.asdict(rule)},
        "sources": train_sha,
        "counts": _counts(lines, skips),
        "per_pair": {"file": PER_PAIR, "sha256": file_sha256(os.path.join(out, PER_PAIR))},
        "shards": {"train": [dataclasses.asdict(i) for i in infos]},
        "skipped": [dataclasses.asdict(s) for s in skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    c = manifest["counts"]
    logging.info("mined %d negatives for %d of %d pairs (k=%d); wrote %d shards, reused %d", c["mined_negatives"],
                 c["pairs_with_mined"], c["pairs"], rule.k, len(written), len(reused))
    return manifest


def _write_lines(path: str, lines: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _produce_pool(task: dict) -> list[bytes]:
    """Worker entry point: one shard of the pairs' sides as candidate records."""
    pairs = RecordReader(task["train"])
    out = []
    for n, (key, slot) in enumerate(task["items"], task["start"]):
        pair = records.decode_pair(pairs.raw(key))
        side = pair.positive if slot < 0 else pair.negatives[slot]
        extra = {"pair_id": pair.pair_id, "role": "positive" if slot < 0 else "negative"}
        instance = json.loads(pair.extra).get("instance")
        if slot < 0 and instance is not None:  # a positive is of its pair's instance: the rule reads it
            extra["instance"] = instance
        out.append(records.encode_candidate(records.CandidateRecord(
            did=side.id, text=side.text, image=side.image, modality=side.modality, source_index=n,
            extra=json.dumps(extra, sort_keys=True))))
    return out


def write_pair_pool(train_dir: str, out: str, *, shard_size: int = POOL_SHARD_SIZE) -> dict:
    """Writes ``candidates-*`` of every distinct side the pairs of ``train_dir/train-*`` name as a positive or a
    negative (by id, in key order; ``extra``: the first pair naming it, its role, a positive's ``instance``) and a
    manifest; returns the manifest. The pool to index (``python -m idmr_jax.search index --data OUT``) when the
    pairs' own candidates are what to mine from (InstructCIR's captions, the universal demo), as M-BEIR's union pool
    is for its pairs. A `ConversionError` naming both records when one id names two different contents."""
    train_dir, out = os.path.abspath(train_dir), os.path.abspath(out)
    check_manifest_owner(os.path.join(out, MANIFEST), POOL_TOOL)
    paths, train_sha, _ = _train_inputs(train_dir)
    reader = RecordReader(paths)
    first: dict[str, tuple[int, str]] = {}  # id -> (global key of its first pair, a digest of its content)
    items = []
    for key in range(len(reader)):
        pair = _decode_pair(reader, key, f"{train_dir}/{TRAIN_GLOB}: record {key} (global key)")
        for slot, side in ((-1, pair.positive), *enumerate(pair.negatives)):
            content = json_digest([side.modality, side.text, side.image.hex() if side.image else None])
            if side.id not in first:
                first[side.id] = (key, content)
                items.append((key, slot))
            elif first[side.id][1] != content:
                raise ConversionError(f"{train_dir}/{TRAIN_GLOB}: candidate id {side.id!r} has another content in "
                                      f"record {key} (global key) than in record {first[side.id][0]}")
    ranges = split_contiguous(len(items), max(1, -(-len(items) // shard_size)))
    plans = []
    for i, (start, stop) in enumerate(ranges):
        task = {"items": items[start:stop], "start": start}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              "train": train_sha, **task})
        plans.append(ShardPlan(shard_name("candidates", i, len(ranges)), digest, {**task, "train": paths}))
    os.makedirs(out, exist_ok=True)
    state = open_shard_state(out, {"tool": POOL_TOOL, "train": train_dir})
    infos, _, _ = write_shards(out, plans, _produce_pool, state)
    manifest = {"tool": {"name": POOL_TOOL, "version": TOOL_VERSION}, "record_schema_version": records.SCHEMA_VERSION,
                "writer_options": WRITER_OPTIONS, "args": {"train": train_dir, "shard_size": shard_size},
                "sources": train_sha, "counts": {"pairs": len(reader), "candidates": len(items)},
                "shards": {"candidates": [dataclasses.asdict(i) for i in infos]}}
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest
