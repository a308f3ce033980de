"""The on-disk search index: bfloat16 embeddings with their candidate ids and modalities, written block by block.

Layout of an index folder::

    index.json          what the index holds: ``format``, ``num_candidates``, ``dim``, ``block_rows``, ``dtype``
                        ("bfloat16"), ``source`` (the candidate shards it was built from) and ``model`` (the
                        checkpoint that embedded them), and ``blocks_done``: the blocks written so far
    embeddings.zarr/    a tensorstore zarr array ``[num_candidates, dim]`` bfloat16, one chunk per block of
                        ``block_rows`` rows, so a block is written (and rewritten on a resume) on its own
    ids-*.array_record  one msgpack map ``{"did", "modality"}`` per candidate, in embedding-row order

An index is complete when every block is in ``blocks_done``; `open_index` refuses an incomplete one. Embeddings
are stored in bfloat16 (2 bytes per dimension: 7 KB a candidate at D = 3584, 40 GB for M-BEIR's 5.6M union pool,
half the float32 matrix) and scored in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import msgpack
import numpy as np

FORMAT = "idmr_jax.search/1"
META = "index.json"
EMBEDDINGS = "embeddings.zarr"
IDS = "ids-00000-of-00001.array_record"


@dataclasses.dataclass
class SearchIndex:
    """An opened, complete index: ``embeddings`` [N, D] float32 (converted from the stored bfloat16 on open)."""

    path: str
    dids: list[str]
    modalities: list[str]
    embeddings: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.dids)


def _zarr_spec(path: str) -> dict:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": os.path.join(path, EMBEDDINGS)}}


def create_index(path: str, dids: Sequence[str], modalities: Sequence[str], dim: int, *, block_rows: int,
                 source: dict, model: dict) -> dict:
    """Starts an empty index (or returns the meta of a matching one being resumed). ValueError when `path` holds
    an index of other candidates, another model or another block size: a resume must continue the same job."""
    import tensorstore as ts
    from array_record.python.array_record_module import ArrayRecordWriter

    if len(dids) != len(modalities) or not dids:
        raise ValueError(f"{len(dids)} ids and {len(modalities)} modalities: need as many, and at least one")
    meta = {"format": FORMAT, "num_candidates": len(dids), "dim": int(dim), "block_rows": int(block_rows),
            "dtype": "bfloat16", "source": source, "model": model, "blocks_done": []}
    existing = read_meta(path) if os.path.exists(os.path.join(path, META)) else None
    if existing is not None:
        same = {k: v for k, v in existing.items() if k != "blocks_done"} == {k: v for k, v in meta.items()
                                                                              if k != "blocks_done"}
        if not same:
            raise ValueError(f"{path} holds an index of other candidates, model or block size; give a new --out")
        return existing
    os.makedirs(path, exist_ok=True)
    writer = ArrayRecordWriter(os.path.join(path, IDS), "group_size:1")
    for did, modality in zip(dids, modalities):
        writer.write(msgpack.packb({"did": did, "modality": modality}, use_bin_type=True))
    writer.close()
    ts.open(_zarr_spec(path), create=True, delete_existing=True, dtype=ts.bfloat16, shape=[len(dids), int(dim)],
            chunk_layout=ts.ChunkLayout(chunk_shape=[int(block_rows), int(dim)])).result()
    _write_meta(path, meta)
    return meta


def read_meta(path: str) -> dict:
    """The index.json of `path`; ValueError naming the file for anything but an index of this format."""
    file = os.path.join(path, META)
    with open(file, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: not an {FORMAT} index (format {meta.get('format')!r})")
    return meta


def _write_meta(path: str, meta: dict) -> None:
    tmp = os.path.join(path, f"{META}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, META))


def num_blocks(meta: dict) -> int:
    """Blocks of ``block_rows`` rows (the last one may be short)."""
    return -(-meta["num_candidates"] // meta["block_rows"])


def write_block(path: str, meta: dict, block: int, embeddings: np.ndarray) -> dict:
    """Writes block `block`'s rows (any float array, stored as bfloat16) and records it as done; returns the meta.
    The embeddings are written before the meta names the block, so a kill in between only redoes the block."""
    import ml_dtypes
    import tensorstore as ts

    rows = meta["block_rows"]
    start, stop = block * rows, min((block + 1) * rows, meta["num_candidates"])
    if embeddings.shape != (stop - start, meta["dim"]):
        raise ValueError(f"block {block}: embeddings {embeddings.shape}, expected {(stop - start, meta['dim'])}")
    store = ts.open(_zarr_spec(path)).result()
    store[start:stop].write(np.asarray(embeddings, np.float32).astype(ml_dtypes.bfloat16)).result()
    meta = {**meta, "blocks_done": sorted(set(meta["blocks_done"]) | {int(block)})}
    _write_meta(path, meta)
    return meta


def write_index(path: str, dids: Sequence[str], modalities: Sequence[str], embeddings: np.ndarray, *,
                block_rows: int = 1024, source: dict | None = None, model: dict | None = None) -> SearchIndex:
    """A whole index from embeddings in memory (tests, small pools); `open_index` of the result."""
    meta = create_index(path, dids, modalities, embeddings.shape[1], block_rows=block_rows, source=source or {},
                        model=model or {})
    for b in range(num_blocks(meta)):
        meta = write_block(path, meta, b, embeddings[b * block_rows:(b + 1) * block_rows])
    return open_index(path)


def open_index(path: str) -> SearchIndex:
    """A complete index, its embeddings as float32; ValueError naming the blocks missing from an incomplete one."""
    import tensorstore as ts
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    meta = read_meta(path)
    missing = sorted(set(range(num_blocks(meta))) - set(meta["blocks_done"]))
    if missing:
        raise ValueError(f"{path}: incomplete index, blocks {missing[:10]}{'...' if len(missing) > 10 else ''} of "
                         f"{num_blocks(meta)} not written yet: resume `python -m idmr_jax.search index`")
    source = ArrayRecordDataSource([os.path.join(path, IDS)])
    rows = [msgpack.unpackb(source[i], raw=False) for i in range(len(source))]
    embeddings = np.asarray(ts.open(_zarr_spec(path)).result().read().result(), np.float32)
    return SearchIndex(path, [r["did"] for r in rows], [r["modality"] for r in rows], embeddings, meta)


def search(index: SearchIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Nq, k] float32, row indices [Nq, k]) of the `k` best candidates per query by dot product, best
    first (ties: the lower row first), with the chunked top-k of `idmr_jax.evaluation.ranking`."""
    from idmr_jax.evaluation.ranking import rank_gallery

    queries = np.asarray(queries, np.float32)
    top = rank_gallery(queries, index.embeddings, top=k)
    scores = np.einsum("qd,qkd->qk", queries, index.embeddings[top])  # only the k found rows are gathered
    return scores.astype(np.float32), top
