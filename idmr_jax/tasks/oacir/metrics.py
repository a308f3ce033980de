"""OACIR evaluation metrics: R@K and R_ID@K with the reference removed, per subset and averaged.

Protocol (released ``evaluate.py``, ``compute_oacirr_val_metrics`` / ``compute_class_recall``):
- each query ranks its subset's whole gallery by similarity, and the reference image is deleted from the ranking
  (it is part of the gallery and would otherwise trivially match its own instance);
- R@K: the target is within the first K of what is left (K in 1, 5, 10, 50); the target must be in the
  gallery exactly once (the released code asserts this);
- R_ID@K: some image of the query's instance (the parent folder of the image path) is within the first K. The
  released code takes the instance of the *target* (the paper calls it the reference's instance; in OACIRR the
  two are the same object by construction). It reports K in 1, 3, 5; we add 10 and 50;
- values are percentages; "avg" (paper Table 2) is the mean of R_ID@1, R@1 and R@5 over the subsets.

Ties: the released code uses ``torch.argsort`` (not stable), so tied scores rank arbitrarily there. We rank by
score descending, then by gallery index ascending (:mod:`idmr_jax.evaluation.ranking`, the rule of
:mod:`idmr_jax.evaluation.retrieval` too).

The result files are written by :mod:`idmr_jax.evaluation.outputs`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

RECALL_KS = (1, 5, 10, 50)
ID_KS = (1, 3, 5, 10, 50)
AVG_METRICS = ("R_ID@1", "R@1", "R@5")


def _index_of(names: Sequence[str]) -> dict[str, int]:
    table = {}
    for i, n in enumerate(names):
        if n in table:
            raise ValueError(f"gallery name {n!r} appears twice (indices {table[n]} and {i})")
        table[n] = i
    return table


def remove_reference(rankings: np.ndarray, reference_index: np.ndarray) -> np.ndarray:
    """Drops each row's reference (index -1: not in the gallery) and returns ``[Nq, L-1]`` rankings.

    A row whose reference is absent (or was cut off by a top-k) loses its last entry instead, so all rows keep
    the same length and the first L-1 places are always right.
    """
    keep = rankings != reference_index[:, None]
    # Stable argsort of ~keep moves the (at most one) removed entry to the end without reordering the rest.
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(rankings, order, axis=1)[:, : rankings.shape[1] - 1]


def compute_recalls(
    rankings,
    *,
    gallery_names: Sequence[str],
    gallery_instances: Sequence[Hashable],
    reference_names: Sequence[str],
    target_names: Sequence[str],
    query_instances: Sequence[Hashable] | None = None,
    query_ids: Sequence[str] | None = None,
    ks: Sequence[int] = RECALL_KS,
    id_ks: Sequence[int] = ID_KS,
) -> dict[str, float]:
    """R@K and R_ID@K in percent for one subset: ``{"R@1": ..., "R_ID@1": ...}``.

    Args:
      rankings: ``[Nq, L]`` gallery indices, best first, either the full ranking (L = Ng, e.g. from
        :func:`idmr_jax.evaluation.ranking.rank_scores`) or a top-L list with ``L >= max(K) + 1`` (one place is
        lost to the reference).
      gallery_names / gallery_instances: name and instance id of every gallery image (same order).
      reference_names / target_names: per query. A reference missing from the gallery is simply not removed.
      query_instances: the instance R_ID looks for, per query; default: the target's instance (as released).
      query_ids: names used in error messages and nothing else (default: the query's position).

    Raises:
      ValueError naming the query when its target is not in the gallery or is its own reference.
    """
    rankings = np.asarray(rankings)
    nq, length = rankings.shape
    ng = len(gallery_names)
    if len(gallery_instances) != ng:
        raise ValueError(f"{len(gallery_instances)} gallery instances for {ng} gallery names")
    if not (len(reference_names) == len(target_names) == nq):
        raise ValueError(f"{nq} rankings, {len(reference_names)} references, {len(target_names)} targets")
    qid = (lambda i: query_ids[i]) if query_ids is not None else (lambda i: f"#{i}")
    where = _index_of(gallery_names)

    ref_idx = np.array([where.get(r, -1) for r in reference_names], np.int64)
    tgt_idx = np.empty(nq, np.int64)
    for i, t in enumerate(target_names):
        if t not in where:
            raise ValueError(f"query {qid(i)}: target {t!r} is not in the gallery")
        if t == reference_names[i]:
            raise ValueError(f"query {qid(i)}: target {t!r} is its own reference, removed from the ranking")
        tgt_idx[i] = where[t]

    cleaned = remove_reference(rankings, ref_idx)
    available = cleaned.shape[1]
    # A truncated list must reach every K; a full ranking just has fewer than K items left for tiny galleries.
    for kk in (*ks, *id_ks):
        if kk > available and length < ng:
            raise ValueError(f"rankings of length {length} cannot give @{kk}: need at least {kk + 1}")

    codes: dict[Hashable, int] = {}
    gal_code = np.array([codes.setdefault(x, len(codes)) for x in gallery_instances], np.int64)
    if query_instances is None:
        q_code = gal_code[tgt_idx]
    else:
        q_code = np.array([codes.get(x, -1) for x in query_instances], np.int64)

    def first_hit(hits: np.ndarray) -> np.ndarray:
        return np.where(hits.any(axis=1), hits.argmax(axis=1), np.iinfo(np.int64).max)

    tgt_rank = first_hit(cleaned == tgt_idx[:, None])
    id_rank = first_hit(gal_code[cleaned] == q_code[:, None])
    out = {f"R@{kk}": float(np.mean(tgt_rank < kk) * 100.0) for kk in ks}
    out.update({f"R_ID@{kk}": float(np.mean(id_rank < kk) * 100.0) for kk in id_ks})
    return out


def aggregate(per_subset: Mapping[str, Mapping[str, float]], avg_metrics: Sequence[str] = AVG_METRICS) -> dict:
    """Flat ``{"<subset>/<metric>": value, ..., "avg": mean of `avg_metrics` over all subsets}``."""
    flat = {f"{s}/{m}": float(v) for s, ms in per_subset.items() for m, v in ms.items()}
    picked = [per_subset[s][m] for s in per_subset for m in avg_metrics]
    flat["avg"] = float(np.mean(picked)) if picked else float("nan")
    return flat


def ranking_records(
    rankings,
    *,
    query_ids: Sequence[str],
    subset: str,
    gallery_names: Sequence[str],
    reference_names: Sequence[str],
    target_names: Sequence[str] | None = None,
    top: int = 50,
) -> list[dict]:
    """One ``{"query_id", "subset", "ranking": [top gallery names]}`` per query, reference removed; with
    `target_names` also ``"reference"`` and ``"target"``, so that a record can be scored on its own (the CAAM
    analyses score groups of queries this way)."""
    rankings = np.asarray(rankings)
    where = _index_of(gallery_names)
    ref_idx = np.array([where.get(r, -1) for r in reference_names], np.int64)
    cleaned = remove_reference(rankings, ref_idx)[:, :top]
    names = np.asarray(gallery_names, dtype=object)
    records = [
        {"query_id": str(q), "subset": subset, "ranking": names[row].tolist()} for q, row in zip(query_ids, cleaned)
    ]
    if target_names is not None:
        for rec, ref, tgt in zip(records, reference_names, target_names, strict=True):
            rec["reference"], rec["target"] = str(ref), str(tgt)
    return records
