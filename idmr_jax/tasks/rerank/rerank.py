"""Reranking the retriever's top-K (LamRA; K = 5 by default): pointwise, listwise, or fused with retrieval.

Only the top K of each ranking is reordered: nothing below K moves and nothing from below K enters the top K.
Within the top K the candidates are sorted by score, best first, ties kept in retrieval order (a stable sort):

    pointwise  P("Yes") of each (query, candidate) prompt
    listwise   P(index of the candidate) from one prompt listing the top K in retrieval order, numbered 1..K
    fused      weight * normalised retrieval score + (1 - weight) * the reranker's score (P("Yes") by default)

The retrieval scores are normalised by min-max over the query's top K, (s - min) / (max - min), so they span
[0, 1] like the probabilities they are added to (the top-1 gets 1, the K-th 0); a top K of equal scores
normalises to all ones, leaving the order to the reranker.

Zero-shot reranking (MM-Embed's prompt-and-rerank) is `rerank_queries` with a model that had no reranker
training, e.g. the retriever's own embedder or an imported MLLM: the prompts, answer tokens, scores and fusion
are exactly the same; only the weights differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idmr_jax.tasks.rerank.prompts import listwise_prompt, pointwise_prompt
from idmr_jax.tasks.rerank.scoring import RerankScorer

MODES = ("pointwise", "listwise", "fused")
FUSE_WITH = ("pointwise", "listwise")


def normalise_retrieval(scores: Sequence[float]) -> np.ndarray:
    """Min-max normalisation of one query's top-K retrieval scores to [0, 1] (all ones when they are equal)."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return s
    span = s.max() - s.min()
    return np.ones_like(s) if span == 0 else (s - s.min()) / span


def fused_scores(retrieval_top: Sequence[float], rerank_top: Sequence[float], weight: float) -> np.ndarray:
    """``weight * normalise_retrieval(retrieval_top) + (1 - weight) * rerank_top``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight {weight}: must be in [0, 1]")
    return weight * normalise_retrieval(retrieval_top) + (1.0 - weight) * np.asarray(rerank_top, np.float64)


def rerank_order(retrieval_top: Sequence[float], rerank_top: Sequence[float], *, mode: str = "pointwise",
                 weight: float = 0.5) -> np.ndarray:
    """The new order of a top K (indices into it), best first; ties keep their retrieval order."""
    if mode not in MODES:
        raise ValueError(f"rerank mode {mode!r}: use one of {MODES}")
    key = fused_scores(retrieval_top, rerank_top, weight) if mode == "fused" else np.asarray(rerank_top, np.float64)
    return np.argsort(-key, kind="stable")


def rerank_top_k(ranked_ids: Sequence[Sequence[Any]], retrieval_scores: Sequence[Sequence[float]],
                 rerank_scores: Sequence[Sequence[float]], *, k: int = 5, mode: str = "pointwise",
                 weight: float = 0.5) -> list[list[Any]]:
    """Each query's ranking with its top ``n = min(k, len(ranking))`` reordered (`rerank_order`) and the rest as it
    was. ``rerank_scores[q]`` holds the reranker's scores of query q's top n, in retrieval order;
    ``retrieval_scores[q]`` its retrieval scores (at least the top n; only they are read)."""
    if k < 1:
        raise ValueError(f"k = {k}: need at least 1")
    if not len(ranked_ids) == len(retrieval_scores) == len(rerank_scores):
        raise ValueError(f"{len(ranked_ids)} rankings, {len(retrieval_scores)} retrieval score lists and "
                         f"{len(rerank_scores)} rerank score lists: need one of each per query")
    out = []
    for q, (ids, retrieval, rerank) in enumerate(zip(ranked_ids, retrieval_scores, rerank_scores)):
        ids = list(ids)
        n = min(k, len(ids))
        if len(rerank) != n or len(retrieval) < n:
            raise ValueError(f"query {q}: {len(rerank)} rerank and {len(retrieval)} retrieval scores for its top "
                             f"{n}: need {n} rerank scores and at least {n} retrieval scores")
        order = rerank_order(list(retrieval)[:n], rerank, mode=mode, weight=weight)
        out.append([ids[i] for i in order] + ids[n:])
    return out


def _top(ranking: Mapping, k: int, where: str, candidates_by_id: Mapping[str, Any]) -> tuple[list, list, list]:
    """(dids, retrieval scores, candidate records) of a query_index result's top k."""
    results = list(ranking["results"])[:k]
    missing = [r["did"] for r in results if r["did"] not in candidates_by_id]
    if missing:
        raise ValueError(f"{where}: candidates {missing[:5]} of its ranking are not in candidates_by_id")
    return ([r["did"] for r in results], [float(r["score"]) for r in results],
            [candidates_by_id[r["did"]] for r in results])


def score_top_k(scorer: RerankScorer, queries: Sequence[Any], candidates_by_id: Mapping[str, Any],
                rankings: Sequence[Mapping], *, k: int = 5, modes: Sequence[str] = MODES
                ) -> dict[str, list[np.ndarray]]:
    """The reranker's scores of each query's top k, in retrieval order: ``{"pointwise": [...], "listwise": [...]}``
    (each only when `modes` need it; "fused" needs its `fuse_with` scores: ask for them through `modes`)."""
    if len(queries) != len(rankings):
        raise ValueError(f"{len(queries)} queries but {len(rankings)} rankings")
    tops = [_top(r, k, f"query {q}", candidates_by_id) for q, r in enumerate(rankings)]
    out: dict[str, list[np.ndarray]] = {}
    if "pointwise" in modes:
        prompts = [pointwise_prompt(scorer.prompts, query, cand) for query, (_, _, cands) in zip(queries, tops)
                   for cand in cands]
        flat = scorer.pointwise(prompts)
        bounds = np.cumsum([0] + [len(ids) for ids, _, _ in tops])
        out["pointwise"] = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if "listwise" in modes:
        listed = [(q, listwise_prompt(scorer.prompts, query, cands)) for q, (query, (_, _, cands))
                  in enumerate(zip(queries, tops)) if cands]
        scores = scorer.listwise([p for _, p in listed], [len(tops[q][2]) for q, _ in listed])
        out["listwise"] = [np.zeros(0, np.float32)] * len(queries)
        for (q, _), s in zip(listed, scores):
            out["listwise"][q] = s
    return out


def rerank_queries(model, task_like, queries: Sequence[Any], candidates_by_id: Mapping[str, Any],
                   rankings: Sequence[Mapping], *, k: int = 5, weight: float = 0.5, fuse_with: str = "pointwise",
                   modes: Sequence[str] = MODES, scorer: RerankScorer | None = None, **scorer_kw
                   ) -> dict[str, list[list[str]]]:
    """Reranked rankings ``{mode: [[did, ...] per query]}`` for each of `modes`.

    `queries[i]` (any object with ``text`` / ``image``: a query record, or a `Side` holding the instructed text)
    goes with ``rankings[i]`` (`idmr_jax.search.build.query_index`'s ``{"results": [{"did", "score"}, ...]}``,
    best first); `candidates_by_id` maps each did to its record. "fused" fuses with the `fuse_with` scores.
    `scorer` (or a new `RerankScorer(model, task_like, **scorer_kw)`) runs the prompts in blocks; pass one to
    reuse its compiled programs. With an untrained `model` this is zero-shot reranking (module docstring)."""
    bad = [m for m in modes if m not in MODES]
    if bad or fuse_with not in FUSE_WITH:
        raise ValueError(f"modes {list(modes)} / fuse_with {fuse_with!r}: use modes from {MODES}, fuse_with from "
                         f"{FUSE_WITH}")
    needed = {m for m in modes if m != "fused"} | ({fuse_with} if "fused" in modes else set())
    scorer = scorer or RerankScorer(model, task_like, **scorer_kw)
    scores = score_top_k(scorer, queries, candidates_by_id, rankings, k=k, modes=tuple(sorted(needed)))
    ids = [[r["did"] for r in ranking["results"]] for ranking in rankings]
    retrieval = [[float(r["score"]) for r in ranking["results"]] for ranking in rankings]
    return {mode: rerank_top_k(ids, retrieval, scores[fuse_with if mode == "fused" else mode], k=k, mode=mode,
                               weight=weight)
            for mode in modes}
