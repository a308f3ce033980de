"""M-BEIR evaluation of the MLLM embedder (UniIR's protocol, `idmr_jax.tasks.universal.mbeir`).

Reads converted shards (``python -m data_prep.mbeir``) from ``config.data.val_dir``: every candidate is embedded
once (candidate prompts), every query once (its instruction fixed per query: `mbeir.instruction_for`), and each
key's queries are ranked against their pool with the chunked top-k of `idmr_jax.evaluation.ranking`:
``config.eval.pool`` "local" = the key's local pool (the candidates whose ``extra["pools"]`` holds it), "global" =
every candidate of the shards (convert with ``--pool global`` for M-BEIR's union pool). Ties keep the lower
candidate index (shard order) first.

Writes ``WORKDIR/eval/mbeir/metrics.json`` (``mbeir/<key>/R@K`` in percent and ``mbeir/avg/headline``) and
``WORKDIR/eval/mbeir/rankings.jsonl`` (``{"query_id": qid, "ranking": [did, ...]}``, the top 50, or the largest K
of the key when larger, or the whole pool when smaller).

Memory: candidate embeddings are float32, ``4 * D`` bytes each (D = the LM's hidden size: 14 KB at Qwen2-7B's
3584, so the 5.6M union pool is ~80 GB and is embedded in blocks and searched in chunks, sharded over the mesh for
real runs; on one host, keep it in bf16 or shard it, see BENCHMARKS.md "retrieval").
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from idmr_jax.data.grain_io import list_shards
from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.ranking import rank_gallery
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.encode import AnyModalityEncoder
from idmr_jax.tasks.universal.prompts import load_prompt_set

DEPTH = 50
POOLS = ("local", "global")


def query_texts(queries: list[records.QueryRecord]) -> list[str]:
    """The text each query's prompt holds: its instruction (fixed per query) and its text, as UniIR joins them."""
    return [mbeir.instructed_text(mbeir.choose_instruction(q.qid, q.instruction_set), q.text) for q in queries]


def candidate_texts(candidates: list[records.CandidateRecord]) -> list[str]:
    """A candidate's text as UniIR formats it ("" for an image-only candidate)."""
    return [mbeir.uniir_text(c.text) for c in candidates]


def pool_members(queries: list[records.QueryRecord], candidates: list[records.CandidateRecord],
                 pool: str) -> dict[str, np.ndarray]:
    """Key -> indices of the candidates its queries rank (see the module docstring)."""
    if pool not in POOLS:
        raise ValueError(f"config.eval.pool = {pool!r}: use one of {POOLS}")
    everyone = np.arange(len(candidates))
    in_pool: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        for name in c.extra_fields.get("pools", ()):
            in_pool.setdefault(name, []).append(i)
    out = {}
    for q in queries:
        key, local = q.extra_fields["key"], q.extra_fields.get("pool", "")
        if key not in out:
            out[key] = everyone if pool == "global" else np.asarray(in_pool.get(local, []), np.int64)
        if out[key].size == 0:
            raise ValueError(f"mbeir/{key}: pool {local!r} holds no candidate in these shards")
    return out


def evaluate_mbeir(task, model, workdir) -> dict:
    """The M-BEIR protocol on ``config.data.val_dir``; writes the outputs and returns the metrics."""
    cfg = task.config
    folder = cfg.data.val_dir
    queries = records.read_queries(list_shards(folder, "queries-*.array_record"))
    candidates = records.read_candidates(list_shards(folder, "candidates-*.array_record"))
    encoder = AnyModalityEncoder(model, task, load_prompt_set(cfg.data.get("prompt_set", "")))
    cand = encoder.embed("candidate", candidates, candidate_texts(candidates))
    qry = encoder.embed("query", queries, query_texts(queries))
    by_key: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_key.setdefault(q.extra_fields["key"], []).append(i)
    pools = pool_members(queries, candidates, cfg.eval.get("pool", "local"))
    rankings = {}
    for key, rows in by_key.items():
        depth = max(DEPTH, *mbeir.KS.get(key, (1, 5, 10)))
        top = rank_gallery(qry[rows], cand[pools[key]], top=depth)
        for row, i in zip(top, rows):
            rankings[queries[i].qid] = [candidates[pools[key][j]].did for j in row]
    metrics = mbeir.compute_metrics({k: [queries[i] for i in rows] for k, rows in by_key.items()}, rankings)
    if jax.process_index() == 0:
        outputs.write_results(workdir, metrics, [{"query_id": q, "ranking": r} for q, r in rankings.items()],
                              subdir="mbeir")
    print(f"mbeir: {len(queries)} queries of {len(by_key)} keys against {len(candidates)} candidates "
          f"({cfg.eval.get('pool', 'local')} pools)")
    return metrics
