"""Query -> gallery top-k with AdaFocal's max-over-tokens similarity, chunked and optionally sharded.

``score(q, g) = max_t <query[q], gallery[g, t]>`` (the released ``inference`` takes the max over the 32 target
tokens). The gallery is scanned in fixed-size chunks with a running ``lax.top_k`` merge, so memory is
``O(Nq * (k + chunk))`` whatever the gallery size and time is linear in it. Gallery features may be stored in
bfloat16: they are then multiplied as bf16 with float32 accumulation against a query split into bf16 parts
(:func:`split_query`), which keeps float32-query accuracy at the speed of bf16 matrix units; float32 galleries
are scored in float32.

Tie rule (shared with :mod:`idmr_jax.evaluation.ranking`): higher score first, and among equal scores the
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
SUB_CHUNK_ROWS = 4096  # gallery token rows per matrix product by default (see `_chunk_scores`)


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


def split_query(query, gallery_dtype, terms: int) -> jax.Array:
    """The query as the matmul operand for a gallery of `gallery_dtype`: ``[terms * Nq, E]``.

    For a bfloat16 gallery the query is split into `terms` bfloat16 parts whose sum is the float32 query to
    about ``2**(-8 * terms)`` relative (hi = bf16(q), lo = bf16(q - hi), ...), so every product runs on bf16
    operands with float32 accumulation (the fast path of TPU/GPU matrix units and of CPUs with AMX/AVX512-BF16)
    while the scores stay those of a float32 query: the gallery values are exact in bf16 already. Other
    galleries are scored in float32 with one term.
    """
    q = query.astype(jnp.float32)
    if jnp.dtype(gallery_dtype) != jnp.bfloat16:
        return q
    parts, rest = [], q
    for _ in range(terms):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(jnp.float32)
    return jnp.concatenate(parts, axis=0)


def _block_scores(qs, block, terms, precision):
    """float32 ``[C, Nq]`` max-over-tokens scores of one gallery block ``[C, T, E]`` (see :func:`split_query`).

    One ``[C*T, E] x [E, terms*Nq]`` product with the gallery tokens as rows: the token axis then sits next to
    the gallery axis, so the max over tokens reads contiguous rows.
    """
    c, t, e = block.shape
    rows = block.reshape(c * t, e)
    if qs.dtype != jnp.bfloat16:
        rows = rows.astype(jnp.float32)
    s = jax.lax.dot_general(rows, qs, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)
    return s.reshape(c, t, terms, -1).sum(axis=2).max(axis=1)


def _chunk_scores(qs, chunk, terms, precision, sub):
    """``[Nq, C]`` scores of a gallery chunk, computed `sub` items at a time.

    Why sub-blocks: the ``[sub*T, Nq]`` products then stay in cache while their max over tokens is taken;
    scoring a 1024-item chunk in one product writes and re-reads a 130 MB array (1000 queries, 32 tokens) and
    was 1.6x slower on CPU. Only the reduced ``[C, Nq]`` scores are kept for the top-k merge.
    """
    c = chunk.shape[0]
    if c <= sub:
        return _block_scores(qs, chunk, terms, precision).T
    n_sub, rest = divmod(c, sub)

    def body(j, buf):
        blk = jax.lax.dynamic_slice_in_dim(chunk, j * sub, sub, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(buf, _block_scores(qs, blk, terms, precision), j * sub, 0)

    buf = jax.lax.fori_loop(0, n_sub, body, jnp.zeros((c, qs.shape[0] // terms), jnp.float32))
    if rest:
        buf = buf.at[n_sub * sub :].set(_block_scores(qs, chunk[n_sub * sub :], terms, precision))
    return buf.T


def _local_topk(query, gallery, k, chunk, n_valid, offset, precision, terms, sub):
    """Running top-k over `gallery` in chunks; global index = offset + local index, >= n_valid is padding.

    Full chunks are read with ``dynamic_slice`` inside a ``fori_loop`` (no padded copy of the gallery); the
    remainder, if any, is one smaller block merged last, so its indices stay the largest, as the tie rule needs.
    """
    n_local = gallery.shape[0]
    qs = split_query(query, gallery.dtype, terms)
    terms = qs.shape[0] // query.shape[0]
    nq = query.shape[0]
    init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), _SENTINEL, jnp.int32))

    def score_block(start, size, carry):
        block = jax.lax.dynamic_slice_in_dim(gallery, start, size, axis=0)
        idx = offset + start + jnp.arange(size, dtype=jnp.int32)
        s = jnp.where(idx < n_valid, _chunk_scores(qs, block, terms, precision, sub), -jnp.inf)
        return _merge(*carry, s, idx, k)

    n_full = n_local // chunk
    carry = jax.lax.fori_loop(0, n_full, lambda c, carry: score_block(c * chunk, chunk, carry), init)
    rest = n_local - n_full * chunk
    if rest:
        carry = score_block(n_full * chunk, rest, carry)
    return carry


def _compiler_options() -> dict[str, str]:
    """XLA options for the retrieval programs on this backend.

    On CPU the ``float-normalization-bf16`` pass rewrites bfloat16 values carried by the chunk loop as float32
    at the loop's entry, which for a bfloat16 gallery means a float32 copy of all of it (32 GB at 10^6 x 32 x
    256, measured as compiled temp memory) and products that no longer run on bf16 units. Every operation here
    supports bfloat16 on CPU (slices, reshapes, bf16 x bf16 -> f32 dots), so the pass is turned off for these
    programs only: compiled temp memory at 10^5 items drops from 3.35 GB to 47 MB and the search is 1.35x
    faster. Other backends keep their defaults.
    """
    if jax.default_backend() == "cpu":
        return {"xla_disable_hlo_passes": "float-normalization-bf16"}
    return {}


@functools.lru_cache(maxsize=None)
def _single_fn(backend: str):
    del backend  # the cache key: options depend on the backend

    def fn(query, gallery, k, chunk_size, precision, terms, sub):
        return _local_topk(query, gallery, k, chunk_size, gallery.shape[0], 0, precision, terms, sub)

    return jax.jit(fn, static_argnames=("k", "chunk_size", "precision", "terms", "sub"),
                   compiler_options=_compiler_options())


def _topk_single(query, gallery, k, chunk_size, precision, terms, sub):
    return _single_fn(jax.default_backend())(query, gallery, k=k, chunk_size=chunk_size, precision=precision,
                                             terms=terms, sub=sub)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, axes: tuple[str, ...], k: int, chunk: int, n_valid: int, precision, terms: int,
                sub: int):
    """jit(shard_map): each device scores its gallery shard, keeps a local top-k, then all devices merge."""

    def per_shard(query, gallery):
        offset = (jax.lax.axis_index(axes) * gallery.shape[0]).astype(jnp.int32)
        s, i = _local_topk(query, gallery, k, chunk, n_valid, offset, precision, terms, sub)
        # [n_shards, Nq, k] in shard order -> [Nq, n_shards*k]: candidates stay in increasing-index order.
        s_all = jax.lax.all_gather(s, axes, axis=1, tiled=True)
        i_all = jax.lax.all_gather(i, axes, axis=1, tiled=True)
        top_s, pos = jax.lax.top_k(s_all, k)
        return top_s, jnp.take_along_axis(i_all, pos, axis=1)

    fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(fn, compiler_options=_compiler_options())


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
    query_terms: int = 2,
    sub_chunk: int | None = None,
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
        (TPU/GPU defaults use bf16/tf32 passes), at some speed cost. Applies to float32 galleries.
      query_terms: for a bfloat16 gallery, the number of bfloat16 parts the query is split into (see
        :func:`split_query`): 2 (default) scores within ~1e-6 of a float32 query, so rankings match the float32
        reference; 1 is faster still, with score errors of ~5e-4 on unit vectors (bf16 rounding of the query).
      sub_chunk: gallery items per matrix product inside a chunk (keeps the products in cache); default:
        ``4096 // T`` (4096 token rows: 128 items of 32 tokens, the fastest measured on CPU).
    """
    ng = gallery.shape[0]
    if not 0 < k <= ng:
        raise ValueError(f"k={k} must be in [1, gallery size {ng}]")
    if sub_chunk is None:
        sub_chunk = max(1, SUB_CHUNK_ROWS // gallery.shape[1])
    if chunk_size < 1 or sub_chunk < 1 or query_terms < 1:
        raise ValueError(f"chunk_size, sub_chunk and query_terms must be positive, got {chunk_size}, {sub_chunk}, "
                         f"{query_terms}")
    precision = jax.lax.Precision(precision) if isinstance(precision, str) else precision

    if mesh is None:
        gallery = jnp.asarray(gallery)  # once: the query-block loop below must not re-transfer it
        run = lambda q: _topk_single(q, gallery, k, min(chunk_size, ng), precision, query_terms,
                                            sub_chunk)  # noqa: E731
    else:
        axes = tuple(mesh.axis_names if axes is None else axes)
        n_shards = int(np.prod([mesh.shape[a] for a in axes]))
        pad = (-ng) % n_shards
        if pad:  # on the host when the gallery is there, so no single device holds a padded full copy
            xp = np if isinstance(gallery, np.ndarray) else jnp
            gallery = xp.pad(gallery, ((0, pad), (0, 0), (0, 0)))
        gallery = jax.device_put(gallery, NamedSharding(mesh, P(axes)))
        local = (ng + pad) // n_shards
        fn = _sharded_fn(mesh, axes, k, min(chunk_size, local), ng, precision, query_terms, sub_chunk)
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
