"""Retrieve, mine, rerank: MM-Embed's and LamRA's closed loop as one command (``configs/rerank.py:demo``).

A config with a ``loop`` field is this pipeline (``python -m idmr_jax.main`` runs `run_loop`). Its steps, each in
its own folder under the workdir, each resumable (a training step resumes from its checkpoints, the index from its
finished blocks, the mining and the pool from their finished shards):

    retrieval/     the first embedder, trained on the training pairs (``loop.retrieval`` overrides); or, with
                   ``loop.embedder_workdir``, an existing embedder workdir evaluated here and reused
    pool/          every candidate the pairs name (`mining.write_pair_pool`)
    index/         the pool embedded by the first embedder (`idmr_jax.search.build.build_index`)
    mined_pairs/   the pairs with negatives mined from the first embedder's own top k (MM-Embed's modality rule,
                   ``loop.mining``: `idmr_jax.tasks.universal.mining`)
    mined/         the embedder trained further on the mined pairs, from the first one (``loop.mined``)
    control/       (when ``loop.control`` is set) the same further training on the pairs without mined negatives
                   (the pipeline fills the negative columns with random other pairs' positives): what the extra
                   steps alone give, so that ``mined/`` minus ``control/`` is the mining's share
    reranker/      LamRA's joint pointwise + listwise reranker, from the retrained embedder, on the mined pairs
                   (``loop.reranker``); its evaluation reranks that embedder's top K (`idmr_jax.tasks.rerank.evaluate`)

``WORKDIR/metrics.json`` gathers the results: ``retrieval/<metric>``, ``mined/<metric>`` (``control/<metric>``),
and the reranker's ``rerank_pointwise/``, ``rerank_listwise/``, ``rerank_fused/`` (and ``retriever/``: what it
reranked, which is ``mined/`` again). Each step's overrides are ``(dotted field, value)`` pairs laid over the
config, as a stage's are (`idmr_jax.train.stages.apply_overrides`); the loop itself sets the data and init paths
that chain the steps.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from idmr_jax.train.stages import apply_overrides, write_merged_results

def step_config(config: ml_collections.ConfigDict, overrides, **paths: str) -> ml_collections.ConfigDict:
    """`config` without ``loop``, with one step's `overrides` and then the loop's own `paths` (``train_dir``,
    ``val_dir``, ``init_path``: the data and weights that chain the steps; empty ones are left as they are)."""
    out = copy.deepcopy(config)
    out.unlock()
    del out["loop"]
    apply_overrides(out, overrides)
    for field, name in (("data.train_dir", "train_dir"), ("data.val_dir", "val_dir"), ("model.init.path", "init_path")):
        if paths.get(name):
            apply_overrides(out, [(field, paths[name])])
    return out


def _demo_dirs(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(train_dir, val_dir) of the first embedder's data: built (or reused) when it is the demo's."""
    from idmr_jax import tasks

    prepared = tasks.prepare_data(config)
    return prepared.data.train_dir, prepared.data.val_dir


def _index_and_mine(config: ml_collections.ConfigDict, embedder_dir: str, train_dir: str, workdir: str) -> dict:
    """Steps pool, index and mined_pairs; returns the mining manifest's counts."""
    import jax

    from idmr_jax.mine import embed_pair_queries
    from idmr_jax.search import build, store
    from idmr_jax.tasks.universal import mining

    pool, index_dir, mined = (os.path.join(workdir, s) for s in ("pool", "index", "mined_pairs"))
    if jax.process_index() == 0:
        mining.write_pair_pool(train_dir, pool)
    embedder = build.load_embedder(embedder_dir)
    build.build_index(embedder, build.open_source("shards", pool), index_dir)
    index = store.open_index(index_dir)
    queries = embed_pair_queries(embedder, train_dir)
    rule = mining.MiningRule(**config.loop.mining.to_dict())
    if jax.process_index() != 0:
        return {}
    manifest = mining.mine_shards(train_dir, index, queries, mined, rule=rule, strict=True,
                                  query_model=embedder.source)
    return manifest["counts"]


def run_loop(config: ml_collections.ConfigDict, workdir: str,
             run_training: Callable[[ml_collections.ConfigDict, str], dict]) -> dict:
    """Runs the steps of the module docstring; ``run_training(config, workdir) -> results`` is one training run (or
    evaluation, with ``mode = "eval"``) as ``python -m idmr_jax.main`` runs it. Returns (and, on process 0, writes
    to ``WORKDIR/metrics.json``) the merged results."""
    loop = config.loop
    first = step_config(config, loop.retrieval)
    train_dir, val_dir = _demo_dirs(first)
    results: dict[str, Any] = {}

    def record(prefix: str, out: dict | None) -> None:
        results.update({f"{prefix}{k}": v for k, v in (out or {}).items()})

    print(f"\n=== loop step retrieval: {workdir}/retrieval")
    if loop.embedder_workdir:
        embedder_dir = loop.embedder_workdir
        reuse = step_config(config, [*loop.retrieval, ("mode", "eval"), ("model.init.format", "workdir")],
                            train_dir=train_dir, val_dir=val_dir, init_path=embedder_dir)
        record("retrieval/", run_training(reuse, os.path.join(workdir, "retrieval")))
    else:
        embedder_dir = os.path.join(workdir, "retrieval")
        record("retrieval/", run_training(first, embedder_dir))

    print(f"\n=== loop steps pool, index, mined_pairs: {workdir}")
    counts = _index_and_mine(config, embedder_dir, train_dir, workdir)
    if counts:
        print("mined: " + json.dumps(counts, sort_keys=True))
    mined_pairs = os.path.join(workdir, "mined_pairs")

    print(f"\n=== loop step mined: {workdir}/mined")
    mined = step_config(config, loop.mined, train_dir=mined_pairs, val_dir=val_dir, init_path=embedder_dir)
    record("mined/", run_training(mined, os.path.join(workdir, "mined")))

    if loop.get("control"):
        print(f"\n=== loop step control: {workdir}/control")
        control = step_config(config, loop.control, train_dir=train_dir, val_dir=val_dir, init_path=embedder_dir)
        record("control/", run_training(control, os.path.join(workdir, "control")))

    print(f"\n=== loop step reranker: {workdir}/reranker")
    reranker = step_config(config, loop.reranker, train_dir=mined_pairs, val_dir=val_dir,
                           init_path=os.path.join(workdir, "mined"))
    record("", run_training(reranker, os.path.join(workdir, "reranker")))

    write_merged_results(workdir, results)
    return results
