"""Gallery rankings, with one tie rule everywhere: higher score first, equal scores keep the lower gallery index
first (the rule of :mod:`idmr_jax.evaluation.retrieval`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from idmr_jax.evaluation.retrieval import topk_retrieval


def rank_scores(scores) -> np.ndarray:
    """Gallery indices ``[Nq, Ng]`` sorted by score descending; equal scores keep the lower index first."""
    return np.argsort(-np.asarray(scores), axis=1, kind="stable")


def rank_gallery(query: np.ndarray, gallery: np.ndarray, top: int) -> np.ndarray:
    """Indices ``[Nq, min(top, Ng)]`` of the best gallery items per query.

    `gallery` is ``[Ng, E]`` (dot-product score) or ``[Ng, T, E]`` (AdaFocal's max-over-tokens score). Chunked over
    the gallery and over queries, so the score block stays bounded for real gallery sizes.
    """
    if gallery.ndim == 2:
        gallery = gallery[:, None, :]
    k = min(top, gallery.shape[0])
    _, idx = topk_retrieval(jnp.asarray(query), jnp.asarray(gallery), k, chunk_size=min(2048, gallery.shape[0]),
                            query_chunk=min(512, query.shape[0]))
    return np.asarray(idx)
