"""The reranker measured where it works: on its retriever's top K of the demo's zero-shot CIR val split.

``config.eval.benchmark == "demo_cir"`` (the universal demo's val shards in ``config.data.val_dir``,
`idmr_jax.tasks.universal.demo_eval`). The retriever is the embedder workdir ``config.rerank.retriever``, or, when
that is empty, the workdir the reranker started from (``model.init.path`` with ``init.format = "workdir"``): the
reranker then reorders exactly the rankings its own starting point produced.

1. The retriever embeds the val queries and the whole gallery and ranks it (`demo_eval.evaluate_demo_cir`'s
   ranking: equal scores keep the lower candidate index first); each query's reference image is removed, as the
   protocol removes it before counting.
2. The top ``rerank.k`` of each ranking is reranked pointwise, listwise and fused
   (`idmr_jax.tasks.rerank.rerank.rerank_queries`, fusion weight ``rerank.fusion_weight``); nothing below K moves.
3. Every ranking is counted by `demo_eval.cir_metrics`: ``retriever/demo_cir/R@K`` (the retriever alone, which
   equals that workdir's own evaluation) and ``rerank_<mode>/demo_cir/R@K``. Reranking the top 5 can only change
   R@1 (and R_ID@1): R@5 and R@10 equal the retriever's by construction.

Writes ``WORKDIR/eval/rerank/metrics.json`` and ``WORKDIR/eval/rerank_<mode>/rankings.jsonl``.
"""

from __future__ import annotations

import jax
import numpy as np

from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.ranking import rank_gallery
from idmr_jax.tasks.rerank.prompts import load_rerank_prompts
from idmr_jax.tasks.rerank.rerank import MODES, rerank_queries
from idmr_jax.tasks.rerank.scoring import RerankScorer
from idmr_jax.tasks.universal import records
from idmr_jax.tasks.universal.demo_eval import CIR_KEY, cir_metrics, ranking_records

BENCHMARKS = (CIR_KEY,)
RETRIEVER = "retriever"


def retriever_workdir(config) -> str:
    """``rerank.retriever``, else the embedder workdir the reranker started from; ValueError when neither."""
    named = config.rerank.get("retriever", "")
    if named:
        return named
    init = config.model.init
    if init.format == "workdir" and init.path:
        return init.path
    raise ValueError("the reranker's evaluation reranks a retriever's top K: set config.rerank.retriever to an "
                     "embedder's training workdir (or start the reranker from one: model.init.format=workdir)")


def _retrieval(retriever: str, val_dir: str, batch_size: int):
    """(queries, gallery dids, [Nq, Ng] scores, [Nq, Ng] full rankings) of the retriever on the val shards."""
    from idmr_jax.search.build import load_embedder
    from idmr_jax.tasks.universal.evaluate import embed_split

    embedder = load_embedder(retriever, batch_size=batch_size)
    with embedder.on_mesh():
        queries, index, qry, cand = embed_split(embedder.task, embedder.model, val_dir)
    scores = np.asarray(qry, np.float32) @ np.asarray(cand, np.float32).T
    return queries, list(index.dids), scores, rank_gallery(qry, cand, top=len(index))


def _with_reference_last(ranking: list[str], reference: str) -> list[str]:
    """A ranking without its reference, given back the reference at the end: `cir_metrics` removes it again, so
    the counted order is exactly `ranking`."""
    return list(ranking) + [reference]


def evaluate_reranker(task, model, workdir) -> dict:
    """Steps 1-3 of the module docstring; writes the outputs and returns the metrics."""
    cfg = task.config
    if cfg.eval.benchmark not in BENCHMARKS:
        raise ValueError(f"config.eval.benchmark = {cfg.eval.benchmark!r}: the reranker is evaluated on "
                         f"{BENCHMARKS} (the retrieve-mine-rerank demo, configs/rerank.py:demo)")
    if not cfg.data.val_dir:
        raise ValueError("config.data.val_dir is empty: the reranker's evaluation needs the val shards")
    queries, gallery, scores, rankings = _retrieval(retriever_workdir(cfg), cfg.data.val_dir, cfg.eval.batch_size)
    column = {did: i for i, did in enumerate(gallery)}
    extras = [q.extra_fields for q in queries]
    qids, refs = [q.qid for q in queries], [e["reference"] for e in extras]
    counted = dict(gallery=gallery, query_ids=qids, references=refs, targets=[q.positives[0] for q in queries],
                   instance_positives=[e["instance_positives"] for e in extras])
    metrics = cir_metrics(rankings, prefix=f"{RETRIEVER}/{CIR_KEY}", **counted)
    cleaned = [r["ranking"] for r in ranking_records(rankings, gallery=gallery, query_ids=qids, references=refs)]
    retrieved = [{"results": [{"did": did, "score": float(scores[q, column[did]])} for did in ranking]}
                 for q, ranking in enumerate(cleaned)]
    candidates = {c.did: c for c in records.read_candidates(f"{cfg.data.val_dir}/candidates-*.array_record")}
    r = cfg.rerank
    scorer = RerankScorer(model, task, prompts=load_rerank_prompts(r.prompt_set), max_length=int(r.list_max_len))
    reranked = rerank_queries(model, task, queries, candidates, retrieved, k=int(r.k), weight=float(r.fusion_weight),
                              modes=MODES, scorer=scorer)
    for mode, lists in reranked.items():
        full = np.asarray([[column[d] for d in _with_reference_last(ranking, ref)]
                           for ranking, ref in zip(lists, refs)])
        metrics.update(cir_metrics(full, prefix=f"rerank_{mode}/{CIR_KEY}", **counted))
        if jax.process_index() == 0:
            outputs.write_rankings(workdir, [{"query_id": q, "ranking": ranking} for q, ranking in zip(qids, lists)],
                                   subdir=f"rerank_{mode}")
    if jax.process_index() == 0:
        outputs.write_metrics(workdir, metrics, subdir="rerank")
    print(f"rerank top {r.k} of {len(queries)} queries: " + ", ".join(
        f"{k} {v:.1f}" for k, v in metrics.items() if k.endswith(("R@1", "R_ID@1"))))
    return metrics
