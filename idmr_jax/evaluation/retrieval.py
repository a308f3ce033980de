"""Query -> gallery top-k with AdaFocal's max-over-tokens similarity, chunked and optionally sharded.

``score(q, g) = max_t <query[q], gallery[g, t]>`` (the released ``inference`` takes the max over the 32 target
tokens). The gallery is scanned in fixed-size chunks with a running ``lax.top_k`` merge, so memory is
``O(Nq * (k + chunk * T))`` whatever the gallery size and time is linear in it. Gallery features may be stored
in bfloat16; every chunk is upcast and scored in float32.

Tie rule (shared with :mod:`idmr_jax.evaluation.metrics`): higher score first, and among equal scores the
lower gallery index first. It holds because ``lax.top_k`` puts the lower position first on ties and every merge
concatenates candidates in increasing gallery-index order (the running top-k, sorted by (score desc, index
asc) and holding only earlier indices, then the new chunk; across devices, shard 0 first). Scores must be finite
(no NaN/inf features); otherwise the ordering of those entries is unspecified.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_SENTINEL = np.iinfo(np.int32).max  # index of "no candidate yet"; never survives when k <= gallery size


def scores_numpy(query, gallery, block: int = 4096, *, blas: bool = False) -> np.ndarray:
    """Dense float32 ``[Nq, Ng]`` max-over-tokens scores in NumPy (reference; gallery read in blocks).

    ``blas=False``: the definition as one ``np.einsum`` (NumPy's own loops, one thread). ``blas=True``: the same
    scores through a BLAS matrix product per block (``[C*T, E] @ [E, Nq]``), many times faster; equal up to
    float32 rounding.
    """
    q = np.asarray(query, np.float32)
    g = np.asarray(gallery)
    out = np.empty((q.shape[0], g.shape[0]), np.float32)
    for s in range(0, g.shape[0], block):
        blk = np.asarray(g[s : s + block], np.float32)
        if blas:
            c, t, e = blk.shape
            out[:, s : s + block] = (blk.reshape(c * t, e) @ q.T).reshape(c, t, -1).max(1).T
        else:
            out[:, s : s + block] = np.einsum("qe,gte->qgt", q, blk).max(-1)
    return out


def topk_numpy(query, gallery, k: int, *, blas: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: ``(scores [Nq, k] float32, indices [Nq, k] int32)``, ties -> lower index first.

    ``blas=True`` scores with :func:`scores_numpy`'s BLAS path and selects with ``argpartition`` before sorting
    the k survivors (the straightforward fast NumPy implementation, used as a benchmark baseline); the tie rule
    then holds within the top k but not across its boundary.
    """
    s = scores_numpy(query, gallery, blas=blas)
    if not 0 < k <= s.shape[1]:
        raise ValueError(f"k={k} must be in [1, gallery size {s.shape[1]}]")
    if blas:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
        ps = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -ps), axis=1)
        idx = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(s, idx, axis=1), idx.astype(np.int32)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order.astype(np.int32)


def _merge(best_s, best_i, s, idx, k):
    """Top-k of (running, new) with the running candidates first, so ties keep the lower index."""
    cat_s = jnp.concatenate([best_s, s], axis=1)
    cat_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape).astype(jnp.int32)], axis=1)
    top_s, pos = jax.lax.top_k(cat_s, k)
    return top_s, jnp.take_along_axis(cat_i, pos, axis=1)


def _block_scores(q, block, precision):
    """float32 ``[Nq, C]`` max-over-tokens scores of one gallery block ``[C, T, E]`` (any storage dtype).

    One ``[C*T, E] x [E, Nq]`` product with the gallery tokens as rows: the token axis then sits next to the
    gallery axis, so the max over tokens reads contiguous rows and only the small ``[C, Nq]`` result is
    transposed (scoring ``[Nq, C, T]`` instead was about 20% slower on CPU).
    """
    c, t, e = block.shape
    s = jax.lax.dot_general(block.reshape(c * t, e).astype(jnp.float32), q, (((1,), (1,)), ((), ())),
                            precision=precision)
    return s.reshape(c, t, -1).max(axis=1).T


def _local_topk(query, gallery, k, chunk, n_valid, offset, precision):
    """Running top-k over `gallery` in chunks; global index = offset + local index, >= n_valid is padding.

    Full chunks are read with ``dynamic_slice`` inside a ``fori_loop`` (no padded copy of the gallery); the
    remainder, if any, is one smaller block merged last, so its indices stay the largest, as the tie rule needs.
    """
    n_local = gallery.shape[0]
    q = query.astype(jnp.float32)
    nq = q.shape[0]
    init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), _SENTINEL, jnp.int32))

    def score_block(start, size, carry):
        block = jax.lax.dynamic_slice_in_dim(gallery, start, size, axis=0)
        idx = offset + start + jnp.arange(size, dtype=jnp.int32)
        s = jnp.where(idx < n_valid, _block_scores(q, block, precision), -jnp.inf)
        return _merge(*carry, s, idx, k)

    n_full = n_local // chunk
    carry = jax.lax.fori_loop(0, n_full, lambda c, carry: score_block(c * chunk, chunk, carry), init)
    rest = n_local - n_full * chunk
    if rest:
        carry = score_block(n_full * chunk, rest, carry)
    return carry


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "precision"))
def _topk_single(query, gallery, k, chunk_size, precision):
    return _local_topk(query, gallery, k, chunk_size, gallery.shape[0], 0, precision)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, axes: tuple[str, ...], k: int, chunk: int, n_valid: int, precision):
    """jit(shard_map): each device scores its gallery shard, keeps a local top-k, then all devices merge."""

    def per_shard(query, gallery):
        offset = (jax.lax.axis_index(axes) * gallery.shape[0]).astype(jnp.int32)
        s, i = _local_topk(query, gallery, k, chunk, n_valid, offset, precision)
        # [n_shards, Nq, k] in shard order -> [Nq, n_shards*k]: candidates stay in increasing-index order.
        s_all = jax.lax.all_gather(s, axes, axis=1, tiled=True)
        i_all = jax.lax.all_gather(i, axes, axis=1, tiled=True)
        top_s, pos = jax.lax.top_k(s_all, k)
        return top_s, jnp.take_along_axis(i_all, pos, axis=1)

    fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(fn)


def topk_retrieval(
    query,
    gallery,
    k: int,
    *,
    chunk_size: int = 1024,
    query_chunk: int | None = None,
    mesh: Mesh | None = None,
    axes: Sequence[str] | None = None,
    precision: str | jax.lax.Precision = "highest",
) -> tuple[jax.Array, jax.Array]:
    """Top-k gallery items per query: ``(scores [Nq, k] float32, indices [Nq, k] int32)``.

    Args:
      query: ``[Nq, E]`` query features (L2-normalised upstream).
      gallery: ``[Ng, T, E]`` gallery token features, float32 or bfloat16.
      k: number of results, ``1 <= k <= Ng``. For R@50 with the reference removed use ``k >= 51``.
      chunk_size: gallery items scored per step (per device when sharded); bounds memory.
      query_chunk: if set, queries are processed in blocks of this size (the last block is padded so only one
        program is compiled); bounds the ``[Nq, chunk, T]`` score block.
      mesh, axes: shard the gallery over these mesh axes (default: all of them); each device keeps a local
        top-k which is then gathered and merged. Ng is zero-padded to a multiple of the shard count; padded
        items score -inf and can never be returned.
      precision: matmul precision; "highest" keeps rankings equal to the float32 reference on every backend
        (TPU/GPU defaults use bf16/tf32 passes), at some speed cost.
    """
    ng = gallery.shape[0]
    if not 0 < k <= ng:
        raise ValueError(f"k={k} must be in [1, gallery size {ng}]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    precision = jax.lax.Precision(precision) if isinstance(precision, str) else precision

    if mesh is None:
        gallery = jnp.asarray(gallery)  # once: the query-block loop below must not re-transfer it
        run = lambda q: _topk_single(q, gallery, k, min(chunk_size, ng), precision)  # noqa: E731
    else:
        axes = tuple(mesh.axis_names if axes is None else axes)
        n_shards = int(np.prod([mesh.shape[a] for a in axes]))
        pad = (-ng) % n_shards
        if pad:  # on the host when the gallery is there, so no single device holds a padded full copy
            xp = np if isinstance(gallery, np.ndarray) else jnp
            gallery = xp.pad(gallery, ((0, pad), (0, 0), (0, 0)))
        gallery = jax.device_put(gallery, NamedSharding(mesh, P(axes)))
        local = (ng + pad) // n_shards
        fn = _sharded_fn(mesh, axes, k, min(chunk_size, local), ng, precision)
        run = lambda q: fn(q, gallery)  # noqa: E731

    nq = query.shape[0]
    if query_chunk is None or query_chunk >= nq:
        return run(jnp.asarray(query))
    outs = []
    for s in range(0, nq, query_chunk):
        q = jnp.asarray(query[s : s + query_chunk])
        n = q.shape[0]
        if n < query_chunk:  # same shape as the other blocks -> no recompilation
            q = jnp.pad(q, ((0, query_chunk - n), (0, 0)))
        sc, ix = run(q)
        outs.append((sc[:n], ix[:n]))
    return jnp.concatenate([o[0] for o in outs]), jnp.concatenate([o[1] for o in outs])
