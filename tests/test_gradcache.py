"""GradCache (idmr_jax/losses/gradcache.py) against the full-batch gradient, forward and backward.

A small NNX transformer encoder (token embeddings, pre-LN blocks with dropout, last-token pooling, L2 norm)
encodes queries, positives and hard negatives; the loss is InfoNCE over in-batch + hard-negative columns. The
cached gradient must equal plain autodiff (float32, 1e-5): without dropout against the unchunked encoder, with
dropout against the same chunks and keys under ordinary autodiff; jitted, and on an 8-device mesh.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idmr_jax.losses import gradcache
from idmr_jax.losses.contrastive import global_infonce, infonce_dense
from idmr_jax.models.layers import Dense, LayerNorm, make_param, trunc_normal
from idmr_jax.sharding import make_mesh

TOL = dict(rtol=1e-5, atol=1e-5)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, dropout: float, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1, self.ln2 = LayerNorm(d, rngs=rngs), LayerNorm(d, rngs=rngs)
        self.qkv = Dense(d, (3, heads, d // heads), in_axes=("embed",), out_axes=(None, "heads", "kv"), rngs=rngs)
        self.out = Dense((heads, d // heads), d, in_axes=("heads", "kv"), out_axes=("embed",), rngs=rngs)
        self.up = Dense(d, 4 * d, in_axes=("embed",), out_axes=("mlp",), rngs=rngs)
        self.down = Dense(4 * d, d, in_axes=("mlp",), out_axes=("embed",), rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask):
        q, k, v = jnp.moveaxis(self.qkv(self.ln1(x)), 2, 0)  # [b, L, h, dh] each
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None, None, :] > 0, s, -1e9)
        x = x + self.drop(self.out(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)))
        return x + self.drop(self.down(jax.nn.gelu(self.up(self.ln2(x)))))


class Encoder(nnx.Module):
    """Token ids [b, L] + mask -> L2-normalised last-non-pad-token embedding [b, d]."""

    def __init__(self, vocab=50, d=32, heads=4, layers=1, dropout=0.0, *, rngs: nnx.Rngs):
        self.embed = make_param(rngs, trunc_normal(1.0), (vocab, d), ("vocab", "embed"), jnp.float32)
        self.blocks = nnx.List([Block(d, heads, dropout, rngs) for _ in range(layers)])
        self.ln = LayerNorm(d, rngs=rngs)

    def __call__(self, ids, mask):
        x = self.embed[...][ids]
        for blk in self.blocks:
            x = blk(x, mask)
        last = jnp.maximum(mask.sum(-1) - 1, 0)
        h = jnp.take_along_axis(self.ln(x), last[:, None, None], axis=1)[:, 0]
        return h / jnp.linalg.norm(h, axis=-1, keepdims=True)


def _encode(model, x, key):
    if key is not None:
        nnx.reseed(model, dropout=key)
    return model(x["ids"], x["mask"])


def _batch(b, nh, length, vocab=50, seed=0):
    rng = np.random.default_rng(seed)

    def tokens(n):
        ids = rng.integers(1, vocab, size=(n, length)).astype(np.int32)
        lens = rng.integers(2, length + 1, size=n)
        mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
        return {"ids": ids * mask, "mask": mask}

    return tokens(b), tokens(b), tokens(b * nh)


def _loss(model, q_in, t_in, h_in, rng, *, chunk, mode, mesh=None, temp=0.02):
    """InfoNCE over in-batch + hard-negative columns; mode: full | chunked (plain autodiff) | cached."""
    keys = [None, None] if rng is None else list(jax.random.split(rng, 2))

    def enc(x, key):
        if mode == "full":
            return _encode(model, x, key)
        return gradcache.nnx_cached_encode(model, _encode, x, key, chunk_size=chunk, cache=mode == "cached")

    # Candidates (positives, then hard negatives) go through the encoder as one batch, as in VLM2Vec.
    b = q_in["ids"].shape[0]
    q = enc(q_in, keys[0])
    c = enc(jax.tree.map(lambda a, z: jnp.concatenate([a, z]), t_in, h_in), keys[1])
    t, h = c[:b], c[b:].reshape(b, -1, c.shape[-1])
    if mesh is None:
        return infonce_dense(q, t, temp, hard_negatives=h)
    return global_infonce(q, t, temp, mesh=mesh, hard_negatives=h)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "mode", "mesh"),
                   compiler_options=FAST_COMPILE)
def _jit_value_and_grad(params, rest, batch, rng, *, graphdef, chunk, mode, mesh):
    def f(p):
        return _loss(nnx.merge(graphdef, p, rest), *batch, rng, chunk=chunk, mode=mode, mesh=mesh)

    return jax.value_and_grad(f)(params)


def _value_and_grad(model, batch, rng, *, chunk, mode, mesh=None):
    """Loss and parameter gradients, jitted (one compile per model structure, mode, chunk and mesh)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _jit_value_and_grad(params, rest, batch, rng, graphdef=graphdef, chunk=chunk, mode=mode, mesh=mesh)


@functools.lru_cache(maxsize=1)
def _full_batch_reference():
    """(model, batch, full-batch loss and gradients) shared by the single-device and the mesh test."""
    model = Encoder(rngs=nnx.Rngs(0))
    batch = _batch(32, 1, 12)
    return model, batch, _value_and_grad(model, batch, None, chunk=32, mode="full")


def _assert_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def test_matches_full_batch_without_dropout():
    model, batch, ref = _full_batch_reference()
    got = _value_and_grad(model, batch, None, chunk=8, mode="cached")
    assert float(ref[0]) > 0.1  # a loss with gradient to match, not a saturated one
    _assert_close(got, ref)


def test_matches_chunked_autodiff_with_dropout():
    """Same per-chunk keys in both passes: the cached gradient equals autodiff through the same dropout masks."""
    model = Encoder(dropout=0.2, rngs=nnx.Rngs(params=0, dropout=1))
    batch = _batch(16, 1, 12, seed=1)
    rng = jax.random.key(3)
    ref = _value_and_grad(model, batch, rng, chunk=4, mode="chunked")
    got = _value_and_grad(model, batch, rng, chunk=4, mode="cached")
    _assert_close(got, ref)
    # Dropout is really on: another key gives another loss (same compiled function, new key).
    other = _value_and_grad(model, batch, jax.random.key(4), chunk=4, mode="cached")
    assert abs(float(other[0]) - float(got[0])) > 1e-4


def test_sharded_batch_on_8_devices_matches_dense():
    """Batch sharded over (data, fsdp) = (4, 2), global InfoNCE: equals the single-device full-batch gradient."""
    mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
    model, batch, ref = _full_batch_reference()
    sharded = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    chunk = gradcache.global_chunk_size(1, mesh, ("data", "fsdp"))  # 4 chunks of one row per device
    got = _value_and_grad(model, sharded, None, chunk=chunk, mode="cached", mesh=mesh)
    _assert_close(got, ref)


def test_strided_chunks_keep_the_batch_local():
    """With the batch sharded over 8 devices, chunking moves no activations: the compiled encoder gradient holds
    no all-gather / all-to-all / collective-permute, only the all-reduce that sums parameter gradients. The
    contiguous layout (reshape without the transpose) would need data movement; checked to show the test bites."""
    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    model = Encoder(d=16, layers=1, rngs=nnx.Rngs(0))
    x, _, _ = _batch(32, 1, 8)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((32, 16)), NamedSharding(mesh, P("data")))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def encode_fn(p, r, xc, key):
        return _encode(nnx.merge(graphdef, p, r), xc, key)

    def grad_hlo(cached_fn):
        f = lambda p, x, w: (cached_fn(p, rest, x, None) * w).sum()  # noqa: E731
        return jax.jit(jax.grad(f), compiler_options=FAST_COMPILE).lower(params, x, w).compile().as_text()

    hlo = grad_hlo(gradcache.gradcache_encoder(encode_fn, 8))
    moves = ("all-gather", "all-to-all", "collective-permute")
    assert not [m for m in moves if m in hlo], [m for m in moves if m in hlo]
    assert "all-reduce" in hlo

    # Contrast: the contiguous layout puts each chunk on one device, so the compiler must move rows around.
    orig = gradcache.to_chunks, gradcache.from_chunks
    try:
        gradcache.to_chunks = lambda a, n: a.reshape(n, a.shape[0] // n, *a.shape[1:])
        gradcache.from_chunks = lambda y: y.reshape(-1, *y.shape[2:])
        contiguous = grad_hlo(gradcache.gradcache_encoder(encode_fn, 8))
    finally:
        gradcache.to_chunks, gradcache.from_chunks = orig
    assert [m for m in moves if m in contiguous]


def test_peak_memory_at_least_3x_lower():
    """Compiled temp bytes of loss + gradient, batch 64 of 256-token sequences: full batch vs chunks of 8."""
    model = Encoder(vocab=64, d=64, heads=4, layers=2, rngs=nnx.Rngs(0))
    batch = _batch(64, 0, 256, vocab=64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def temp_bytes(mode, chunk):
        def f(p):
            m = nnx.merge(graphdef, p, rest)
            enc = (lambda x: _encode(m, x, None)) if mode == "full" else functools.partial(
                gradcache.nnx_cached_encode, m, _encode, rng=None, chunk_size=chunk)
            return infonce_dense(enc(batch[0]), enc(batch[1]), 0.02)

        compiled = jax.jit(jax.value_and_grad(f), compiler_options=FAST_COMPILE).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, cached = temp_bytes("full", 64), temp_bytes("cached", 8)
    print(f"GradCache temp bytes: full batch {full / 2**20:.1f} MiB, chunks of 8 {cached / 2**20:.1f} MiB, "
          f"ratio {full / cached:.1f}")
    assert full >= 3 * cached


def test_chunk_must_divide_batch():
    model = Encoder(rngs=nnx.Rngs(0))
    x, _, _ = _batch(10, 1, 4)
    with pytest.raises(ValueError, match="divide the batch 10"):
        gradcache.nnx_cached_encode(model, _encode, x, None, chunk_size=4)
