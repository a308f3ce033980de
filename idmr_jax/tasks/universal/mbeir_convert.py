"""An M-BEIR release -> ArrayRecord shards of universal query and candidate records, with a manifest.

    python -m data_prep.mbeir --root /data/M-BEIR --split test --out /data/ar/mbeir-test \
        [--keys visualnews_task0,cirr_task7] [--pool local|global] [--strict] [--workers N]

The reader (`idmr_jax.tasks.universal.mbeir`) parses the files; this module links them, checks the image files
(under `idmr_jax.data.image_files.ReadRules`: inside ``--root``, regular, at most ``--max-image-bytes``, fully
decodable) and writes, into ``--out``:

- ``queries-IIIII-of-NNNNN.array_record``: one query record (`idmr_jax.tasks.universal.records`) per usable query
  of every key (``--keys``, default the 16 test keys), key by key in the given order, each in file order. One set
  for all keys: ``extra["key"]`` names the query's key and ``extra["pool"]`` the pool it is ranked against.
- ``candidates-IIIII-of-MMMMM.array_record``: every usable candidate of the pools the split needs, once (first
  occurrence order), ``extra["pools"]`` listing the pools that hold it. ``--pool local``: each key's local pool
  (`mbeir.local_pool_name`); ``--pool global``: the split's union pool (M-BEIR's 5.6M-candidate pool for test).
- ``manifest.json``: the conventions of ``data_prep.cir``: counts, per-shard records and sha256, the files read
  with their sha256, the arguments, the tool version, and ``skipped``: every entry not converted as is, with its
  file, record (line), field, code and reason. No timestamps: equal inputs give an equal manifest.

Linking rules (the reader's own skips come first in ``skipped``):

- a qid already used by another key's query: ``duplicate_query``, skipped (rankings are keyed by qid);
- positives = the qrels positives (UniIR's relevant set); a query that no qrels line names: ``no_qrels``, skipped;
- a did repeated by another pool with other content: ``duplicate_name``, ignored (the first is kept);
- an image file missing, refused by the read rules or not decoding: ``missing_image``, ``outside_root``,
  ``not_regular_file``, ``image_too_large`` or ``undecodable_image``; the query or candidate is skipped;
- a positive of the query's own dataset that is not a usable candidate of the pools read: ``unknown_name`` (in
  none of them) or ``unusable_image`` (its candidate was skipped); the query is skipped;
- a negative that is not a usable candidate: the same codes, ``entry_ignored``: dropped from the query's record.

Positives of another dataset are never required (the documented OVEN/InfoSeek oddity): on a local pool they are a
miss. Train queries read qrels only where the file exists (else their ``pos_cand_list``); train against
``--pool global`` (UniIR's union train pool: local pools are val/test pools). The instruction set of a
query is the TSV row keyed by (dataset id, query modality, `mbeir.positive_modality`). ``--strict`` turns any
skip into a `ConversionError` listing each one by file, record and field. Finished shards are reused when rerun on
the same inputs (`idmr_jax.data.shards`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence

from idmr_jax.data import image_files
from idmr_jax.data.shards import (WRITER_OPTIONS, ConversionError, ShardPlan, Skip, check_manifest_owner,
                                  file_sha256, json_digest, open_shard_state, probe_image_files, process_pool,
                                  report_skips, shard_name, split_contiguous, write_json_atomic, write_shards)
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.mbeir import Candidate, Query

TOOL_NAME = "data_prep.mbeir"
TOOL_VERSION = 1
MANIFEST = "manifest.json"
RECORDS_PER_SHARD = 1000
POOL_MODES = ("local", "global")

__all__ = ["MANIFEST", "POOL_MODES", "TOOL_NAME", "ConversionError", "convert"]


def _usable_images(items: list, ident: str, root: str, rules: image_files.ReadRules, pool) -> tuple[
        list, dict[str, dict], list[Skip]]:
    """The items whose image (if any) passes the read rules and decodes -> (items, probe by id, skips)."""
    with_image = [item for item in items if item.image_path is not None]
    paths = [os.path.join(root, item.image_path) for item in with_image]
    probes = probe_image_files(paths, root, rules, pool)
    probed, skips = {}, []
    for item, probe in zip(with_image, probes):
        if probe["error"] is None:
            probed[getattr(item, ident)] = probe
        else:
            skips.append(Skip(item.source, item.source_index, getattr(item, ident), "image", probe["code"],
                              f"{item.image_path}: {probe['error']}", "record_skipped"))
    kept = [item for item in items if item.image_path is None or getattr(item, ident) in probed]
    return kept, probed, skips


def _merge_pools(pools: Sequence[list[Candidate]]) -> tuple[list[Candidate], dict[str, list[str]], list[Skip]]:
    """Each did once, in first-occurrence order, with the pools holding it; a repeat with other content is ignored."""
    first: dict[str, Candidate] = {}
    pools_of: dict[str, list[str]] = {}
    skips = []
    for candidates in pools:
        for c in candidates:
            kept = first.setdefault(c.did, c)
            if kept is c:
                pools_of[c.did] = [c.pool]
            elif (kept.text, kept.image_path, kept.modality) == (c.text, c.image_path, c.modality):
                pools_of[c.did].append(c.pool)
            else:
                skips.append(Skip(c.source, c.source_index, c.did, "did", "duplicate_name",
                                  f"also in {kept.source} line {kept.source_index} with other content",
                                  "entry_ignored"))
    return list(first.values()), pools_of, skips


def _missing(did: str, usable: dict[str, Candidate], dropped: set[str]) -> tuple[str, str] | None:
    if did in usable:
        return None
    if did in dropped:
        return "unusable_image", f"candidate {did!r} was skipped (see its own entry)"
    return "unknown_name", f"candidate {did!r} is in none of the pools read"


def _link_queries(queries: list[Query], qrels: dict[str, dict[str, tuple[str, ...]]] | None,
                  usable: dict[str, Candidate], dropped: set[str]) -> tuple[list[Query], list[Skip]]:
    """Positives from the qrels, the home positives required, unknown negatives dropped (module docstring)."""
    linked, skips, keys_of = [], [], {}
    for q in queries:
        if keys_of.setdefault(q.qid, q.key) != q.key:  # rankings are keyed by qid: it must be unique over the keys
            skips.append(Skip(q.source, q.source_index, q.qid, "qid", "duplicate_query",
                              f"also a query of {keys_of[q.qid]}", "record_skipped"))
            continue
        extra = dict(q.extra)
        positives = q.positives
        if qrels is not None and q.key in qrels:
            if q.qid not in qrels[q.key]:
                skips.append(Skip(q.source, q.source_index, q.qid, "qid", "no_qrels",
                                  "no line of its qrels file names it", "record_skipped"))
                continue
            positives = qrels[q.key][q.qid]
            if set(positives) != set(q.positives):
                extra["pos_cand_list"] = list(q.positives)
        q = dataclasses.replace(q, positives=positives, extra=extra)
        home = set(mbeir.home_positives(q))
        problems = [(i, _missing(did, usable, dropped)) for i, did in enumerate(positives) if did in home]
        problems = [(i, missing) for i, missing in problems if missing]
        if problems:
            i, (code, reason) = problems[0]
            skips.append(Skip(q.source, q.source_index, q.qid, f"positives[{i}]", code, reason, "record_skipped"))
            continue
        negatives = []
        for i, did in enumerate(q.negatives):
            missing = _missing(did, usable, dropped)
            if missing:
                skips.append(Skip(q.source, q.source_index, q.qid, f"negatives[{i}]", *missing, "entry_ignored"))
            else:
                negatives.append(did)
        linked.append(dataclasses.replace(q, negatives=tuple(negatives)))
    return linked, skips


def _produce(task: dict) -> Iterator[bytes]:
    """Worker entry point: the encoded records of one shard."""
    root, rules = task["read"]["root"], task["read"]["rules"]
    for item in task["items"]:
        fields = dict(item)
        path = fields.pop("image_path")
        fields.pop("file_size"), fields.pop("mtime_ns")
        image = None
        if path is not None:
            try:
                image, _ = image_files.read_image_file(os.path.join(root, path), root, rules)
            except image_files.ImageFileRefused as e:
                raise ConversionError(f"{path}: changed since it was checked: {e}") from e
        if task["kind"] == records.QUERY_KIND:
            yield records.encode_query(records.QueryRecord(image=image, **fields))
        else:
            yield records.encode_candidate(records.CandidateRecord(image=image, **fields))


def _file_state(item, ident: str, probed: dict[str, dict]) -> dict:
    probe = probed.get(getattr(item, ident), {})
    return {"image_path": item.image_path, "file_size": probe.get("size"), "mtime_ns": probe.get("mtime_ns")}


def _plans(prefix: str, kind: str, items: list[dict], read: dict) -> list[ShardPlan]:
    num = max(1, math.ceil(len(items) / RECORDS_PER_SHARD))
    plans = []
    for i, (start, stop) in enumerate(split_contiguous(len(items), num)):
        task = {"kind": kind, "items": items[start:stop]}
        digest = json_digest({"tool": TOOL_VERSION, "schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS,
                              **task})
        plans.append(ShardPlan(shard_name(prefix, i, num), digest, {**task, "read": read}))
    return plans


def _read_release(root: str, split: str, keys: Sequence[str], pool_mode: str):
    """Every file the conversion reads -> (queries, qrels by key or None, pools, instructions, skips, sources)."""
    instructions = mbeir.read_instructions(root)
    sources = [mbeir.INSTRUCTIONS_FILE]
    queries, skips, qrels = [], [], {}
    for key in keys:
        rows, row_skips = mbeir.read_queries(root, split, key)
        queries += rows
        skips += row_skips
        sources.append(mbeir.query_file(split, key))
        if split != "train" or os.path.isfile(os.path.join(root, mbeir.qrels_file(split, key))):
            qrels[key], qrel_skips = mbeir.read_qrels(root, split, key)
            skips += qrel_skips
            sources.append(mbeir.qrels_file(split, key))
    names = ([mbeir.global_pool_name(split)] if pool_mode == "global"
             else list(dict.fromkeys(mbeir.local_pool_name(key, split) for key in keys)))
    pools = []
    for name in names:
        candidates, pool_skips = mbeir.read_pool(root, name)
        pools.append(candidates)
        skips += pool_skips
        sources.append(mbeir.pool_file(name))
    return queries, qrels, pools, instructions, skips, {rel: file_sha256(os.path.join(root, rel)) for rel in sources}


def convert(root: str, split: str, out: str, *, keys: Sequence[str] | None = None, pool: str = "local",
            strict: bool = False, workers: int = 1, max_image_bytes: int = image_files.DEFAULT_MAX_IMAGE_BYTES,
            follow_external_symlinks: bool = False, overwrite: bool = False) -> dict:
    """Converts one M-BEIR split (see the module docstring); returns the manifest written."""
    if split not in mbeir.SPLITS:
        raise ConversionError(f"mbeir has no split {split!r}; choose from {mbeir.SPLITS}")
    if pool not in POOL_MODES:
        raise ConversionError(f"--pool must be one of {POOL_MODES}, got {pool!r}")
    keys = tuple(dict.fromkeys(keys or mbeir.TEST_KEYS))
    for key in keys:
        try:
            mbeir.parse_key(key)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    root, out = os.path.abspath(root), os.path.abspath(out)
    rules = image_files.ReadRules(max_image_bytes, follow_external_symlinks)
    check_manifest_owner(os.path.join(out, MANIFEST), TOOL_NAME, overwrite=overwrite)
    queries, qrels, pools, instructions, skips, sources = _read_release(root, split, keys, pool)
    with process_pool(workers) as procs:
        merged, pools_of, merge_skips = _merge_pools(pools)
        candidates, cand_probes, cand_skips = _usable_images(merged, "did", root, rules, procs)
        usable = {c.did: c for c in candidates}
        linked, link_skips = _link_queries(queries, qrels, usable, {c.did for c in merged} - set(usable))
        linked, query_probes, query_skips = _usable_images(linked, "qid", root, rules, procs)
        skips += merge_skips + cand_skips + link_skips + query_skips
        report_skips(skips, strict=strict)
        os.makedirs(out, exist_ok=True)
        state = open_shard_state(out, {"tool": TOOL_NAME, "split": split, "pool": pool, "keys": list(keys)})
        modality_of_did = {c.did: c.modality for c in candidates}
        query_items = [dict(
            qid=q.qid, text=q.text, modality=q.modality, task_id=q.task_id, dataset_id=q.dataset_id,
            instruction_set=mbeir.instruction_set(q, instructions, mbeir.positive_modality(q, modality_of_did)),
            positives=q.positives, negatives=q.negatives, source_index=q.source_index,
            extra=json.dumps({**q.extra, "pool": mbeir.global_pool_name(split) if pool == "global"
                              else mbeir.local_pool_name(q.key, split)}, sort_keys=True),
            **_file_state(q, "qid", query_probes)) for q in linked]
        cand_items = [dict(did=c.did, text=c.text, modality=c.modality, source_index=c.source_index,
                           extra=json.dumps({**c.extra, "pools": pools_of[c.did]}, sort_keys=True),
                           **_file_state(c, "did", cand_probes)) for c in candidates]
        read = {"root": root, "rules": rules}
        q_plans = _plans("queries", records.QUERY_KIND, query_items, read)
        c_plans = _plans("candidates", records.CANDIDATE_KIND, cand_items, read)
        infos, written, reused = write_shards(out, q_plans + c_plans, _produce, state, pool=procs)
    by_file = {i.file: dataclasses.asdict(i) for i in infos}
    by_key = {key: sum(1 for q in linked if q.key == key) for key in keys}
    by_pool: dict[str, int] = {}
    for c in candidates:
        for name in pools_of[c.did]:
            by_pool[name] = by_pool.get(name, 0) + 1
    manifest = {
        "tool": {"name": TOOL_NAME, "version": TOOL_VERSION},
        "record_schema_version": records.SCHEMA_VERSION,
        "writer_options": WRITER_OPTIONS,
        "dataset": mbeir.NAME,
        "split": split,
        "args": {"root": root, "split": split, "keys": list(keys), "pool": pool, "strict": strict,
                 "max_image_bytes": max_image_bytes, "follow_external_symlinks": follow_external_symlinks},
        "sources": sources,
        "counts": {"queries": len(linked), "candidates": len(candidates), "skipped": len(skips),
                   "queries_by_key": by_key, "candidates_by_pool": by_pool},
        "shards": {"queries": [by_file[p.file] for p in q_plans], "candidates": [by_file[p.file] for p in c_plans]},
        "skipped": [dataclasses.asdict(s) for s in skips],
    }
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    logging.info("mbeir/%s (%s pool): %d queries, %d candidates, %d skipped; wrote %d shards, reused %d", split, pool,
                 len(linked), len(candidates), len(skips), len(written), len(reused))
    return manifest
