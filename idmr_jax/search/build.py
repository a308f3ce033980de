"""The Python API under ``python -m idmr_jax.search``: load a trained embedder, index a candidate pool, query it.

    embedder = load_embedder("workdir/universal")              # a training workdir (or one step directory)
    embedder = load_imported(config)                          # or config.model.init (hf_llava, random, ...)
    build_index(embedder, open_source("shards", "data/val"), "index/")
    hits = query_index(embedder, store.open_index("index/"), [text_query("a red bus")], k=10)

Indexing runs block by block: a block is ``block_rows`` consecutive candidates of the source, read (`fetch`),
embedded with the candidate prompts by `AnyModalityEncoder` (batch-sharded over every device of the config's
mesh) and written as one chunk of the index (`idmr_jax.search.store.write_block`), so the pool is never in memory
and a rerun of the same job skips the blocks already written. Multi-host: every process runs every block through
the global mesh (each hands over its own devices' rows, `idmr_jax.evaluation.blocks`), and process 0 alone
writes the index.

Candidate sources are registered in `CANDIDATE_SOURCES` (kind -> opener of a path): a new source (a photo folder,
a web page) is one class with ``dids``, ``modalities``, ``with_image``, ``describe()`` and ``fetch(keys)``
and one entry there.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from idmr_jax import runtime, tasks
from idmr_jax import sharding as shd
from idmr_jax.data.grain_io import RecordReader, list_shards
from idmr_jax.data.shards import json_digest
from idmr_jax.search import store
from idmr_jax.tasks.universal import evaluate, records
from idmr_jax.tasks.universal.encode import AnyModalityEncoder
from idmr_jax.tasks.universal.prompts import load_prompt_set

EMBEDDER_TASKS = ("universal", "idmr")
DEFAULT_BLOCK_ROWS = 1024
# Test hook: SIGKILL this process once it has written that many blocks in this run (a crash with no clean-up).
KILL_AFTER_BLOCKS_ENV = "IDMR_SEARCH_KILL_AFTER_BLOCKS"


@dataclasses.dataclass
class Embedder:
    """A universal-task embedder ready to run: its task (config, prompts, tokenizer), the model on the config's
    mesh, and ``source``: where its weights came from (recorded in the index, checked by `query_index`)."""

    task: object
    model: nnx.Module
    source: dict

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.task.config

    @contextlib.contextmanager
    def on_mesh(self):
        """The config's mesh and logical axis rules, active while the model runs."""
        with shd.axis_rules(shd.mesh_from_config(self.config), shd.rules_from_config(self.config)):
            yield

    @functools.cached_property
    def encoder(self) -> AnyModalityEncoder:
        """The block encoder of this model with the config's prompt set (``data.prompt_set``); built once, so
        its compiled programs serve every later call."""
        return AnyModalityEncoder(self.model, self.task, load_prompt_set(self.config.data.get("prompt_set", "")))


def _check_task(config: ml_collections.ConfigDict, where: str) -> None:
    name = tasks.task_name(config)
    if name not in EMBEDDER_TASKS:
        raise ValueError(f"{where}: task {name!r} is not an embedder of any-modality records; the search tool takes "
                         f"a model of the {' or '.join(EMBEDDER_TASKS)} task")


def _with_batch_size(config: ml_collections.ConfigDict, batch_size: int | None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    if batch_size:
        config.eval.batch_size = int(batch_size)
    return config


def load_embedder(workdir: str, *, batch_size: int | None = None) -> Embedder:
    """The model of a training workdir's latest checkpoint (or of a step directory ``W/checkpoints/<step>``),
    rebuilt from the config saved with it. Only the model params are read (no optimiser state), straight into
    their shardings on the config's mesh. `batch_size` overrides ``eval.batch_size`` (rows per encoder call)."""
    from idmr_jax.train import checkpoint, setup
    from idmr_jax.train.workdir import find_checkpoint, read_config

    step_dir, step = find_checkpoint(workdir)
    config = _with_batch_size(read_config(step_dir), batch_size)
    _check_task(config, str(step_dir))
    task = tasks.build(config)
    graphdef, target = setup.abstract_model_state(task, shd.mesh_from_config(config), shd.rules_from_config(config))
    restored = checkpoint.restore_model_state(step_dir, target)
    model = nnx.merge(graphdef, restored["params"], restored["frozen"])
    return Embedder(task, model, {"kind": "workdir", "checkpoint": os.path.abspath(os.fspath(step_dir)),
                                  "step": int(step)})


def load_imported(config: ml_collections.ConfigDict, *, batch_size: int | None = None) -> Embedder:
    """The model of a config's ``model.init`` (``hf_llava`` + path, ``workdir`` + path, or ``random`` on purpose:
    tests and smoke runs), built as the trainer builds it; ValueError when the config names no weights at all."""
    from idmr_jax.train.setup import setup_state
    from idmr_jax.train.state import RANDOM_INIT

    config = _with_batch_size(config, batch_size)
    _check_task(config, "--config")
    init = config.model.init
    if not init.format:
        raise ValueError("--config names no weights (config.model.init.format is empty): set "
                         "--config.model.init.format=hf_llava --config.model.init.path=DIR, or index a training "
                         f"workdir with --model; {RANDOM_INIT!r} indexes random weights on purpose")
    task = tasks.build(config)
    built = setup_state(task, total_steps=1)  # the optimiser state comes along; only the model is kept
    with shd.axis_rules(built.mesh, built.rules):
        state = task.load_pretrained(built.state, built.mesh)
    model = nnx.merge(built.graphdef, state.params, state.frozen)
    # The model config and seed too: two random inits of other sizes or seeds are other models.
    digest = json_digest({"model": config.model.to_dict(), "seed": config.seed})
    return Embedder(task, model, {"kind": "imported", "init_format": init.format,
                                  "init_path": os.path.abspath(init.path) if init.path else "", "config": digest})


# ---------------------------------------------------------------------------------------------- candidate sources


class CandidateSource(Protocol):
    """A pool of candidates to index, read block by block; key = position (= the index's row)."""

    dids: list[str]
    modalities: list[str]

    @property
    def with_image(self) -> np.ndarray: ...  # [N] bool

    def describe(self) -> dict: ...  # JSON: what was indexed (a resume must name the same)

    def fetch(self, keys: list[int]) -> tuple[list, list[str]]: ...  # (records, texts that fill their templates)


class ShardCandidates:
    """The universal ``candidates-*.array_record`` shards of a folder (M-BEIR converted, the universal demo's val
    folder). One pass keeps each candidate's did and modality; text and image bytes are read again per block."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.shards = list_shards(self.folder, evaluate.CANDIDATE_SHARDS)
        self.reader = RecordReader(self.shards)
        self.dids, self.modalities = [], []
        for key in range(len(self.reader)):
            (candidate,) = evaluate.read_candidate_block(self.reader, [key])
            self.dids.append(candidate.did)
            self.modalities.append(candidate.modality)
        repeated = [did for did, n in collections.Counter(self.dids).items() if n > 1]
        if repeated:
            raise ValueError(f"{self.folder}: candidate did {repeated[0]!r} occurs in records "
                             f"{[i for i, d in enumerate(self.dids) if d == repeated[0]]}; search results name "
                             "candidates by did, so each must be unique")

    @property
    def with_image(self) -> np.ndarray:
        return np.asarray([records.MODALITIES[m][1] for m in self.modalities], bool)

    def describe(self) -> dict:
        return {"kind": "shards", "path": self.folder, "shards": [os.path.basename(s) for s in self.shards]}

    def fetch(self, keys: list[int]) -> tuple[list, list[str]]:
        block = evaluate.read_candidate_block(self.reader, keys)
        return block, evaluate.candidate_texts(block)


# Kind -> opener of a path. New sources register here; the CLI's ``index --source KIND`` picks one.
CANDIDATE_SOURCES: dict[str, Callable[[str], CandidateSource]] = {"shards": ShardCandidates}


def open_source(kind: str, path: str) -> CandidateSource:
    """The candidate source of `kind` (a key of `CANDIDATE_SOURCES`) at `path`."""
    if kind not in CANDIDATE_SOURCES:
        raise ValueError(f"unknown candidate source {kind!r}; known: {sorted(CANDIDATE_SOURCES)}")
    return CANDIDATE_SOURCES[kind](path)


# ---------------------------------------------------------------------------------------------- indexing


def embedding_dim(embedder: Embedder, encoder: AnyModalityEncoder) -> int:
    """D of the model's embeddings, from a traced (not compiled, not run) text-only call."""
    ids, mask = encoder.tokenizers["candidate"].batch([encoder.prompts["candidate"]["text"][0].format(text="")])
    with embedder.on_mesh():
        out = jax.eval_shape(lambda i, m: embedder.model.embed(i, m), ids, mask)
    return int(out.shape[-1])


def build_index(embedder: Embedder, source: CandidateSource, out: str, *,
                block_rows: int = DEFAULT_BLOCK_ROWS, log: Callable[[str], None] = print) -> dict:
    """Embeds `source` into the index folder `out` block by block (see the module docstring) and returns the
    index meta. Resumable: blocks already in ``blocks_done`` are skipped; ValueError when `out` holds an index of
    other candidates, another model or another block size."""
    if block_rows < 1:
        raise ValueError(f"block_rows = {block_rows}: need at least 1")
    if not source.dids:
        raise ValueError(f"{source.describe()}: no candidates to index")
    encoder = embedder.encoder
    dim = embedding_dim(embedder, encoder)
    writer = jax.process_index() == 0
    if writer:
        store.create_index(out, source.dids, source.modalities, dim, block_rows=block_rows,
                           source=source.describe(), model=embedder.source)
    runtime.barrier("search_index_created")  # the others read what process 0 created or found
    meta = store.read_meta(out)
    total = store.num_blocks(meta)
    todo = [b for b in range(total) if b not in set(meta["blocks_done"])]
    log(f"index {out}: {len(source.dids)} candidates, {total} blocks of {block_rows}, {total - len(todo)} done "
        f"before, {len(todo)} to embed on {jax.device_count()} devices ({jax.process_count()} processes)")
    kill_after = int(os.environ.get(KILL_AFTER_BLOCKS_ENV, "0") or 0)
    with_image = source.with_image
    for n, block in enumerate(todo, 1):
        start, stop = block * block_rows, min((block + 1) * block_rows, len(source.dids))
        with embedder.on_mesh():
            emb = encoder.embed_fetched("candidate", with_image[start:stop],
                                        lambda keys, start=start: source.fetch([start + k for k in keys]))
        if writer:
            meta = store.write_block(out, meta, block, emb)
        log(f"block {block + 1}/{total}: candidates {start}..{stop - 1} written")
        if kill_after and n >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    runtime.barrier("search_index_written")
    return store.read_meta(out)


# ---------------------------------------------------------------------------------------------- querying


def text_query(text: str | None, image: bytes | None = None, instruction: str | None = None,
               qid: str = "query") -> records.QueryRecord:
    """A query record of a text and / or image bytes (its modality follows from which are given)."""
    text = text if text else None
    modality = records.modality_of(text is not None, image is not None)
    return records.QueryRecord(qid=qid, text=text, image=image, modality=modality,
                               instruction_set=(instruction,) if instruction else (), task_id=0, dataset_id=0,
                               positives=(), negatives=(), source_index=0, extra="{}")


def read_query_shards(folder: str) -> list[records.QueryRecord]:
    """Every query record of the ``queries-*.array_record`` shards in `folder`, read whole (queries are few)."""
    return records.read_queries(list_shards(folder, "queries-*.array_record"))


def check_same_model(embedder: Embedder, index: store.SearchIndex) -> None:
    """ValueError unless `embedder` is the model that embedded `index`: other weights give incomparable scores."""
    if embedder.source != index.meta.get("model"):
        raise ValueError(f"{index.path} was embedded by {index.meta.get('model')}, not by {embedder.source}: "
                         "query with the model that built the index")


def embed_queries(embedder: Embedder, queries: Sequence[records.QueryRecord]) -> np.ndarray:
    """[N, D] float32 query embeddings with the query prompts; texts joined with their instruction as the M-BEIR
    evaluation does (`evaluate.query_texts`: one instruction per query, fixed)."""
    with embedder.on_mesh():
        return embedder.encoder.embed("query", queries, evaluate.query_texts(list(queries)))


def query_index(embedder: Embedder, index: store.SearchIndex, queries: Sequence[records.QueryRecord], *,
                k: int = 10) -> list[dict]:
    """``{"query_id", "results": [{"did", "score", "modality"}, ...]}`` per query: its `k` best candidates by dot
    product (`store.search`), best first."""
    check_same_model(embedder, index)
    if k < 1:
        raise ValueError(f"k = {k}: need at least 1")
    scores, rows = store.search(index, embed_queries(embedder, queries), min(k, len(index)))
    return [{"query_id": q.qid,
             "results": [{"did": index.dids[r], "score": float(s), "modality": index.modalities[r]}
                         for r, s in zip(row, score)]}
            for q, row, score in zip(queries, rows, scores)]
