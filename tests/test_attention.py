"""The shared attention (layers.dot_product_attention: the explicit path and jax.nn.dot_product_attention's) and
the fused projections (layers.fused_dense), against a float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import idmr_jax  # noqa: F401  (sets flax config)
from idmr_jax.models import layers as L
from idmr_jax.models.lora import LoRAConfig

B, T, S, H, DH = 2, 6, 9, 4, 8


def _reference(q, k, v, bias=None, mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + bias) v in float64, with grouped kv heads repeated as transformers' repeat_kv."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool)
    if mask is not None:
        keep &= np.broadcast_to(np.asarray(mask), logits.shape)
    if causal:
        keep &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(keep, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v), probs


def _inputs(kv_heads=H, t=T, s=S, seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, t, H, DH)).astype(np.float32)
    k = r.normal(size=(B, s, kv_heads, DH)).astype(np.float32)
    v = r.normal(size=(B, s, kv_heads, DH)).astype(np.float32)
    bias = (3.0 * r.normal(size=(B, 1, t, s))).astype(np.float32)
    mask = np.ones((B, 1, 1, s), bool)
    mask[1, ..., s - 3:] = False  # padded keys in the second row
    return q, k, v, bias, mask


@pytest.mark.parametrize("implementation", ["explicit", "xla"])
@pytest.mark.parametrize("kv_heads", [H, 2])  # multi-head and grouped-query attention
def test_matches_reference_float32(implementation, kv_heads):
    q, k, v, bias, mask = _inputs(kv_heads)
    attend = jax.jit(lambda *a, causal: L.dot_product_attention(
        *a[:3], bias=a[3], mask=a[4], is_causal=causal, implementation=implementation), static_argnames="causal")
    for causal, t in ((False, T), (True, S)):
        q, k, v, bias, mask = _inputs(kv_heads, t=t)
        out = attend(q, k, v, bias, mask, causal=causal)
        ref, _ = _reference(q, k, v, bias, mask, causal)
        assert out.dtype == jnp.float32 and out.shape == (B, t, H, DH)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_paths_agree_in_bf16_and_keep_float32_logits():
    """bf16 inputs: logits, bias and softmax stay float32 on both paths (a large bias with small differences
    survives), so both paths equal the float64 reference on the bf16-rounded inputs within bf16 output rounding."""
    q, k, v, _, mask = _inputs(2)
    # Differences of 0.5 on top of a bias of 1000: bf16 logits (step 4 at 1000) would erase them.
    bias = 1000.0 + 0.5 * np.arange(S, dtype=np.float32)[None, None, None, :]
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    ref, _ = _reference(*(np.asarray(a, np.float32) for a in (qb, kb, vb)), bias, mask)
    for implementation in ("explicit", "xla"):
        out = L.dot_product_attention(qb, kb, vb, bias=jnp.asarray(bias), mask=mask, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_gradients_agree_across_paths():
    q, k, v, bias, mask = _inputs(2, t=S)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(L.dot_product_attention(
            q, k, v, bias=bias, mask=mask, is_causal=True, implementation=impl)))

    g_explicit = jax.jit(jax.grad(loss("explicit"), argnums=(0, 1, 2)))(q, k, v)
    g_xla = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    assert max(float(jnp.abs(g).max()) for g in g_explicit) > 0.1
    for a, b in zip(g_explicit, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [H, 2])  # multi-head and grouped-query attention
def test_bf16_gradients_match_float32(kv_heads):
    """bf16 inputs on CPU: both products take bf16 operands with float32 sums in the forward and the backward pass
    (models.mixed_matmul); the gradients stay within bf16 rounding of float32's on the same (rounded) inputs,
    with bias, padding mask, causal mask and dropout."""
    q, k, v, bias, mask = _inputs(kv_heads, t=S)
    r = np.random.default_rng(3)
    keep = (r.random((B, H, S, S)) > 0.3).astype(np.float32)
    cot = r.normal(size=(B, S, H, DH)).astype(np.float32)

    def loss(q, k, v):
        out = L.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=True,
                                      probs_dropout=lambda p: p * keep / 0.7)
        return jnp.sum(out.astype(jnp.float32) * cot)

    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    assert ("custom_vjp" in str(jax.make_jaxpr(loss)(*bf16))) == (jax.default_backend() == "cpu")
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*bf16)
    ref = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(a.astype(jnp.float32) for a in bf16))
    for got, want in zip(grads, ref):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.abs(want).max())
        assert scale > 0.1
        assert float(jnp.abs(got.astype(jnp.float32) - want).max()) < 2e-2 * scale


def test_probs_dropout_and_automatic_choice():
    q, k, v, bias, mask = _inputs()
    ref, ref_probs = _reference(q, k, v, bias, mask)
    out, probs = L.dot_product_attention(q, k, v, bias=bias, mask=mask, return_probs=True)
    assert probs.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(probs), ref_probs, atol=1e-6)
    assert float(np.asarray(probs)[1, ..., S - 3:].max()) == 0.0  # padded keys get nothing, whatever the bias
    # Dropout acts on the probabilities before the second matmul (a fixed "dropout" keeps it checkable).
    keep = (np.random.default_rng(3).random((B, H, T, S)) > 0.3).astype(np.float32)
    dropped = L.dot_product_attention(q, k, v, bias=bias, mask=mask, probs_dropout=lambda p: p * keep / 0.7)
    np.testing.assert_allclose(np.asarray(dropped), np.einsum("bhqk,bkhd->bqhd", ref_probs * keep / 0.7, v),
                               atol=1e-5)
    # On CPU the automatic choice is the explicit path (bit for bit); cuDNN needs a GPU.
    auto = L.dot_product_attention(q, k, v, bias=bias, mask=mask)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(out))
    assert not L.cudnn_attention_supported(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), None, None)
    with pytest.raises(ValueError, match="probabilities"):
        L.dot_product_attention(q, k, v, return_probs=True, implementation="xla")
    with pytest.raises(ValueError, match="implementation"):
        L.dot_product_attention(q, k, v, implementation="flash")


def _dense(out_f, *, lora=None, use_bias=True, seed=0):
    layer = L.Dense(16, out_f, in_axes=("embed",), out_axes=("heads", "kv"), use_bias=use_bias, lora=lora,
                    rngs=nnx.Rngs(seed))
    if use_bias:
        layer.bias[...] = jax.random.normal(jax.random.key(seed + 10), layer.bias.shape)
    if lora is not None:
        layer.lora_b[...] = jax.random.normal(jax.random.key(seed + 20), layer.lora_b.shape)
    return layer


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=2, alpha=4.0, dropout=0.0)])
def test_fused_dense_equals_separate_layers(lora):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    layers = [_dense((4, 8), lora=lora, seed=s) for s in range(3)]
    fused = L.fused_dense(layers, x)
    for layer, y in zip(layers, fused):
        np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x)), atol=1e-5)
    # Gradients reach each layer's own kernel (and adapter) through the stacked kernel.
    grads = nnx.grad(lambda ls: sum(jnp.sum(jnp.sin(y)) for y in L.fused_dense(ls, x)))(nnx.List(layers))
    for s, layer in enumerate(layers):
        ref = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)
        np.testing.assert_allclose(np.asarray(grads[s].kernel[...]), np.asarray(ref.kernel[...]), atol=1e-5)
        if lora is not None:
            np.testing.assert_allclose(np.asarray(grads[s].lora_a[...]), np.asarray(ref.lora_a[...]), atol=1e-5)
    # Layers of different shapes (GQA's q vs k/v) fall back to separate calls.
    mixed = [_dense((4, 8)), _dense((2, 8), seed=1)]
    for layer, y in zip(mixed, L.fused_dense(mixed, x)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(layer(x)))
