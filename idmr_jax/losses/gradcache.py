"""GradCache: the gradient of a large-batch contrastive loss at the activation memory of one small chunk.

A contrastive loss couples every example of the global batch, so the batch cannot simply be split into
micro-batches with summed gradients. GradCache (Gao et al. 2021, used by VLM2Vec and IDMR) splits the *encoder*
instead:

1. encode the batch chunk by chunk without keeping activations (no autodiff residuals);
2. compute the loss on the cached embeddings and its gradient w.r.t. them (cheap: ``[B, E]``);
3. re-encode chunk by chunk, each time pulling that chunk's embedding gradient back through the encoder with a
   VJP, and sum the parameter gradients.

Here steps 1 and 3 are the forward and backward of one ``jax.custom_vjp`` function, so the loss is written as
usual (``loss(cached_encode(params, ...))``) and ``jax.value_and_grad`` does step 2 in between: the trainer's
jitted step needs no change. Peak activation memory is one chunk's forward + backward; the price is a second
forward pass.

Chunk layout (GSPMD): chunk ``i`` holds the rows ``i, i + n, i + 2n, ...`` of the ``B``-row batch (``n`` chunks,
``B = n * chunk_size``). With the batch sharded in contiguous blocks over ``D`` devices and ``D`` dividing
``chunk_size``, the reshape ``[B] -> [chunk_size, n]`` keeps the sharding on its leading dimension, so every chunk
is spread evenly over all devices (``chunk_size / D`` of each device's own rows) and no data moves: each device
encodes its local share of every chunk, exactly like per-device GradCache on GPUs with ``chunk_size / D`` rows
per device and step. (Contiguous chunks, rows ``i*c ... (i+1)*c``, would put a whole chunk on a few devices and
leave the others idle at every step.)

Dropout: chunk ``i`` uses ``fold_in(rng, i)`` in both passes, so the re-forward reproduces the forward exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# encode_fn(params, frozen, inputs_chunk, rng_chunk) -> embeddings_chunk [c, ...]
EncodeFn = Callable[[Any, Any, Any, jax.Array | None], jax.Array]


def _batch_size(inputs) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(inputs)}
    if len(sizes) != 1:
        raise ValueError(f"all inputs must share the leading batch dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def to_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
    """``[B, ...] -> [n, B/n, ...]`` with chunk ``i`` = rows ``i, i+n, ...`` (the strided, shard-local layout)."""
    return x.reshape(x.shape[0] // num_chunks, num_chunks, *x.shape[1:]).swapaxes(0, 1)


def from_chunks(y: jax.Array) -> jax.Array:
    """Inverse of :func:`to_chunks`: ``[n, c, ...] -> [n*c, ...]`` in the original row order."""
    return y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])


def chunk_keys(rng: jax.Array | None, num_chunks: int):
    """One key per chunk, ``fold_in(rng, i)``; None stays None (a deterministic encoder)."""
    if rng is None:
        return None
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_chunks))


def _num_chunks(inputs, chunk_size: int) -> int:
    b = _batch_size(inputs)
    if chunk_size <= 0 or b % chunk_size:
        raise ValueError(f"GradCache chunk size {chunk_size} must be positive and divide the batch {b}")
    return b // chunk_size


def chunked_encode(encode_fn: EncodeFn, chunk_size: int, params, frozen, inputs, rng=None) -> jax.Array:
    """The GradCache forward with ordinary autodiff (keeps every chunk's activations).

    Same chunks and per-chunk keys as :func:`gradcache_encoder`, hence the same values and gradients: the
    reference the cached form is tested against when the encoder uses dropout.
    """
    n = _num_chunks(inputs, chunk_size)
    xs = jax.tree.map(lambda x: to_chunks(x, n), inputs)
    keys = chunk_keys(rng, n)
    ys = jax.lax.map(lambda a: encode_fn(params, frozen, a[0], a[1]), (xs, keys))
    return from_chunks(ys)


def gradcache_encoder(encode_fn: EncodeFn, chunk_size: int) -> Callable:
    """Wraps a pure encoder into ``cached(params, frozen, inputs, rng) -> embeddings`` with GradCache gradients.

    Args:
      encode_fn: ``(params, frozen, inputs_chunk, rng_chunk) -> [c, ...]`` embeddings. ``params`` is the
        differentiated pytree, ``frozen`` a pytree that receives no gradient (frozen weights, RNG state),
        ``inputs_chunk`` the inputs pytree restricted to one chunk's rows, ``rng_chunk`` that chunk's key (or
        None). It must be pure: the same arguments give the same embeddings.
      chunk_size: rows per chunk, over the *global* batch (see the module docstring for the layout; with the
        batch sharded over ``D`` devices, ``D`` should divide it, e.g. per-device chunk 8 -> ``8 * D``). It must
        divide the batch.

    Returns:
      A function whose value equals :func:`chunked_encode` and whose VJP w.r.t. ``params`` is computed by a
      ``lax.scan`` over chunks that re-runs each chunk's forward under ``jax.vjp`` against the incoming
      embedding cotangent. Only ``params, frozen, inputs, rng`` are kept between the passes. ``frozen``,
      ``inputs`` and ``rng`` get no gradient. Parameter gradients accumulate in float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"GradCache chunk size must be positive, got {chunk_size}")

    @jax.custom_vjp
    def cached(params, frozen, inputs, rng):
        return chunked_encode(encode_fn, chunk_size, params, frozen, inputs, rng)

    def fwd(params, frozen, inputs, rng):
        # lax.map runs only the primal here: nothing inside the loop is saved for the backward pass.
        out = chunked_encode(encode_fn, chunk_size, params, frozen, inputs, rng)
        return out, (params, frozen, inputs, rng)

    def bwd(res, g):
        params, frozen, inputs, rng = res
        n = _num_chunks(inputs, chunk_size)
        xs = jax.tree.map(lambda x: to_chunks(x, n), inputs)
        gs = to_chunks(g, n)
        keys = chunk_keys(rng, n)

        def step(acc, chunk):
            x, gi, key = chunk
            _, pull = jax.vjp(lambda p: encode_fn(p, frozen, x, key), params)
            (dp,) = pull(gi.astype(g.dtype))
            return jax.tree.map(lambda a, d: a + d.astype(a.dtype), acc, dp), None

        acc0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
        acc, _ = jax.lax.scan(step, acc0, (xs, gs, keys))
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
        return grads, None, None, None

    cached.defvjp(fwd, bwd)
    return cached


def nnx_cached_encode(model: nnx.Module, encode: Callable[[nnx.Module, Any, jax.Array | None], jax.Array],
                      inputs, rng: jax.Array | None, *, chunk_size: int, trainable=nnx.Param,
                      cache: bool = True) -> jax.Array:
    """GradCache over an NNX module: ``encode(module, inputs_chunk, rng_chunk)`` on chunks of ``inputs``.

    The module is split into the `trainable` state (differentiated; pass the trainer's filter so frozen weights
    cost no backward work) and the rest; each chunk merges a fresh copy, so mutations inside `encode` (e.g.
    ``nnx.reseed(module, dropout=rng_chunk)``) never leak between chunks or passes. ``cache=False`` gives the
    same chunked computation with ordinary autodiff (the test reference).
    """
    graphdef, params, rest = nnx.split(model, trainable, ...)

    def encode_fn(p, r, x, key):
        # Fresh Variable objects at this trace level (inside lax.map / scan / vjp), so `encode` may mutate RNG
        # state; merging the caller's Variables would try to update them from an inner trace.
        p, r = jax.tree.map(lambda v: v, (p, r))
        return encode(nnx.merge(graphdef, p, r), x, key)

    if not cache:
        return chunked_encode(encode_fn, chunk_size, params, rest, inputs, rng)
    return gradcache_encoder(encode_fn, chunk_size)(params, rest, inputs, rng)


def global_chunk_size(per_device_chunk: int, mesh: jax.sharding.Mesh, batch_axes: Sequence[str]) -> int:
    """Global GradCache chunk for a per-device chunk (the papers' unit: IDMR uses 8 of 64 rows per GPU)."""
    n = 1
    for a in batch_axes:
        n *= mesh.shape[a]
    return per_device_chunk * n
