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

Candidates are streamed (queries, a few per key, are read whole): `index_candidates` reads every candidate record
once, keeps its did, whether it has an image and the pools that hold it, and drops the rest (text and image bytes)
at once; `embed_candidates` then reads each embedding block's records again by key (`RecordReader`), so at most one
block of ``eval.batch_size`` candidate images is in memory.

What a candidate costs on the host: its float32 embedding, ``4 * D`` bytes (D = the LM's hidden size: 256 B for
the tiny config's 64, 14 KiB for Qwen2-7B's 3584), about 80 B of index (its did as a Python str, an image flag, a
pool entry), and, while its key is ranked, what `rank_gallery` hands to XLA (a pool of every candidate is passed
as the matrix itself; a smaller local pool is gathered into a host copy first). Measured (BENCHMARKS.md, section
8): 435 B of peak memory per candidate at D = 64, against 43.5 KB before streaming with 28 KB images, whose bytes
the old code held for the whole pool. The [N, D] float32 matrix is kept whole on every host: M-BEIR's 5.6M union
pool is 80 GB of it at D = 3584, which needs a host that large; sharding it over hosts or storing it in bf16 is
not done here.
"""

from __future__ import annotations

import array
import dataclasses
import os

import jax
import numpy as np

from idmr_jax.data.grain_io import RecordReader, list_shards
from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.ranking import rank_gallery
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.encode import AnyModalityEncoder
from idmr_jax.tasks.universal.prompts import load_prompt_set

DEPTH = 50
POOLS = ("local", "global")
CANDIDATE_SHARDS = "candidates-*.array_record"


def query_texts(queries: list[records.QueryRecord]) -> list[str]:
    """The text each query's prompt holds: its instruction (fixed per query) and its text, as UniIR joins them."""
    return [mbeir.instructed_text(mbeir.choose_instruction(q.qid, q.instruction_set), q.text) for q in queries]


def candidate_texts(candidates: list[records.CandidateRecord]) -> list[str]:
    """A candidate's text as UniIR formats it ("" for an image-only candidate)."""
    return [mbeir.uniir_text(c.text) for c in candidates]


@dataclasses.dataclass(frozen=True)
class CandidateIndex:
    """What the evaluation keeps of every candidate (global key = position): no text, no image bytes."""

    dids: list[str]
    with_image: np.ndarray  # [N] bool: the candidate has an image (it runs the vision tower)
    pools: dict[str, np.ndarray]  # pool name -> the keys of its candidates, ascending

    def __len__(self) -> int:
        return len(self.dids)


def _decode_candidate(reader: RecordReader, key: int) -> records.CandidateRecord:
    try:
        return records.decode_candidate(reader.raw(key))
    except records.RecordError as e:
        raise ValueError(f"{CANDIDATE_SHARDS} in {os.path.dirname(reader.paths[0])}, record {key} (global key): "
                         f"{e}") from e


def index_candidates(reader: RecordReader) -> CandidateIndex:
    """One pass over every candidate record of `reader`, one record alive at a time (see `CandidateIndex`)."""
    dids, with_image, pools = [], np.zeros(len(reader), bool), {}
    for key in range(len(reader)):
        c = _decode_candidate(reader, key)
        dids.append(c.did)
        with_image[key] = c.image is not None
        for name in c.extra_fields.get("pools", ()):
            pools.setdefault(name, array.array("q")).append(key)  # 8 bytes an entry, not a Python int's 36
    return CandidateIndex(dids, with_image, {name: np.asarray(keys, np.int64) for name, keys in pools.items()})


def read_candidate_block(reader: RecordReader, keys: list[int]) -> list[records.CandidateRecord]:
    """The candidate records at global `keys`: one embedding block's worth, the only candidate images held."""
    return [_decode_candidate(reader, key) for key in keys]


def embed_candidates(encoder: AnyModalityEncoder, reader: RecordReader, index: CandidateIndex) -> np.ndarray:
    """[N, D] float32 candidate embeddings (candidate prompts), the records read block by block from `reader`."""

    def fetch(keys: list[int]) -> tuple[list[records.CandidateRecord], list[str]]:
        block = read_candidate_block(reader, keys)
        return block, candidate_texts(block)

    return encoder.embed_fetched("candidate", index.with_image, fetch)


def pool_members(queries: list[records.QueryRecord], index: CandidateIndex, pool: str) -> dict[str, np.ndarray]:
    """Key -> indices of the candidates its queries rank (see the module docstring)."""
    if pool not in POOLS:
        raise ValueError(f"config.eval.pool = {pool!r}: use one of {POOLS}")
    everyone = np.arange(len(index))
    empty = np.zeros(0, np.int64)
    out = {}
    for q in queries:
        key, local = q.extra_fields["key"], q.extra_fields.get("pool", "")
        if key not in out:
            out[key] = everyone if pool == "global" else index.pools.get(local, empty)
        if out[key].size == 0:
            raise ValueError(f"mbeir/{key}: pool {local!r} holds no candidate in these shards")
    return out


def embed_split(task, model, folder: str) -> tuple[list[records.QueryRecord], CandidateIndex, np.ndarray,
                                                   np.ndarray]:
    """(queries, candidate index, query embeddings, candidate embeddings) of the converted shards in `folder`:
    queries read whole, candidates streamed block by block; prompts from ``config.data.prompt_set``."""
    queries = records.read_queries(list_shards(folder, "queries-*.array_record"))
    reader = RecordReader(list_shards(folder, CANDIDATE_SHARDS))
    index = index_candidates(reader)
    encoder = AnyModalityEncoder(model, task, load_prompt_set(task.config.data.get("prompt_set", "")))
    cand = embed_candidates(encoder, reader, index)
    return queries, index, encoder.embed("query", queries, query_texts(queries)), cand


def evaluate_mbeir(task, model, workdir) -> dict:
    """The M-BEIR protocol on ``config.data.val_dir``; writes the outputs and returns the metrics."""
    cfg = task.config
    queries, index, qry, cand = embed_split(task, model, cfg.data.val_dir)
    by_key: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_key.setdefault(q.extra_fields["key"], []).append(i)
    pools = pool_members(queries, index, cfg.eval.get("pool", "local"))
    rankings = {}
    for key, rows in by_key.items():
        depth = max(DEPTH, *mbeir.KS.get(key, (1, 5, 10)))
        members = pools[key]
        # Members are ascending and distinct, so a pool as large as the matrix is all of it: no host copy.
        gallery = cand if members.size == len(cand) else cand[members]
        top = rank_gallery(qry[rows], gallery, top=depth)
        for row, i in zip(top, rows):
            rankings[queries[i].qid] = [index.dids[members[j]] for j in row]
    metrics = mbeir.compute_metrics({k: [queries[i] for i in rows] for k, rows in by_key.items()}, rankings)
    if jax.process_index() == 0:
        outputs.write_results(workdir, metrics, [{"query_id": q, "ranking": r} for q, r in rankings.items()],
                              subdir="mbeir")
    print(f"mbeir: {len(queries)} queries of {len(by_key)} keys against {len(index)} candidates "
          f"({cfg.eval.get('pool', 'local')} pools; candidate embeddings {cand.shape} float32, {cand.nbytes:,} bytes)")
    return metrics
