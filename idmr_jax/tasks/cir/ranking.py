"""Per-query rankings of a CIR benchmark's candidate pools, in the form the benchmark modules read.

Pools (`benchmarks.base`): a query's own ``candidates`` (GeneCIS) or its group's gallery (every image with the
query's ``group``, in image-shard order). Scores are dot products (``[N, E]`` candidates) or the max over the
candidate's tokens (``[N, T, E]``, BLIP-2's ITC), as `idmr_jax.evaluation.ranking` computes them.

Ties: on a gallery, equal scores keep the lower image-shard index first (the rule everywhere in idmr_jax). On a
query's own pool, equal scores are ordered by a permutation of the slots seeded by the query id, so the target's
slot (GeneCIS puts it first) never wins a tie by its position: a target repeated in its own gallery scores exactly
as its copy, and each is first half of the time across queries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from idmr_jax.evaluation.ranking import rank_gallery
from idmr_jax.tasks.cir.records import ImageRecord, QueryRecord

DEPTH = 51  # the gallery ranks kept per query: CIRR needs 50 after removing the reference


def scores(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """[Nq, Nc] float32 scores of query features against candidate features ([Nc, E] or [Nc, T, E])."""
    if candidates.ndim == 2:
        return query @ candidates.T
    return np.einsum("qe,cte->qct", query, candidates).max(axis=-1)


def _slot_order(query_id: str, n: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(query_id.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).permutation(n)


def rank_own_pool(query_id: str, query_feat: np.ndarray, pool_feats: np.ndarray) -> list[int]:
    """Slot numbers of one query's own pool, best first; ties by the seeded slot permutation (module docstring)."""
    s = scores(query_feat[None], pool_feats)[0]
    perm = _slot_order(query_id, len(s))
    return [int(perm[i]) for i in np.argsort(-s[perm], kind="stable")]


def rank_queries(queries: Sequence[QueryRecord], images: Sequence[ImageRecord], query_feats: np.ndarray,
                 image_feats: np.ndarray, depth: int = DEPTH) -> list[list[str]]:
    """Per query, what `output_ranking` of its benchmark module reads: for a query with its own pool, the slot
    numbers of the whole pool as strings, best first; otherwise image keys, best first: the top `depth` of its
    group's gallery, then every img_set member (``subset``) not among them, in their rank order."""
    index_of = {img.key: i for i, img in enumerate(images)}
    ranked: list[list[str] | None] = [None] * len(queries)
    by_group: dict[str, list[int]] = {}
    for qi, q in enumerate(queries):
        if q.candidates is not None:
            pool = image_feats[[index_of[k] for k in q.candidates]]
            ranked[qi] = [str(j) for j in rank_own_pool(q.query_id, query_feats[qi], pool)]
        else:
            by_group.setdefault(q.group, []).append(qi)
    for group, qis in by_group.items():
        gallery = np.array([i for i, img in enumerate(images) if img.group == group])
        if gallery.size == 0:
            raise ValueError(f"queries of group {group!r} (e.g. {queries[qis[0]].query_id!r}) have no gallery images")
        top = rank_gallery(query_feats[qis], image_feats[gallery], top=depth)
        for row, qi in zip(top, qis):
            keys = [images[gallery[j]].key for j in row]
            listed = set(keys)
            extra = [k for k in dict.fromkeys(queries[qi].subset) if k not in listed]
            if extra:  # members below the cut, in their rank order (ties: lower image index first)
                idx = np.array([index_of[k] for k in extra])
                s = scores(query_feats[qi][None], image_feats[idx])[0]
                keys += [extra[j] for j in np.lexsort((idx, -s))]
            ranked[qi] = keys
    return ranked
