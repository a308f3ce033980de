"""The mixed-precision matmul (models.mixed_matmul.mixed_einsum) and the layers that use it on CPU: bf16 products
with float32 accumulation in the forward AND the backward pass, gradients in the primal dtypes, and float32 inputs
on the unchanged plain path bit for bit. Also the activations' float32 evaluation of bf16 inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import idmr_jax  # noqa: F401  (sets flax config)
from idmr_jax.models import layers as L
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.models.mixed_matmul import contraction_spec, mixed_einsum, uses_mixed_matmul

BF16, F32 = jnp.bfloat16, jnp.float32
BF16_RTOL = 2e-2  # bf16 keeps 8 significant bits: inputs rounded to it move a sum of products by about 2^-8

# (spec, lhs shape, rhs shape): a projection to heads and the attention's two products (heads-major, batch first)
SPECS = [
    ("abc,cde->abde", (2, 5, 16), (16, 3, 8)),
    ("bkqd,bksd->bkqs", (2, 2, 6, 8), (2, 2, 9, 8)),
    ("bkqs,bksd->bkqd", (2, 2, 6, 9), (2, 2, 9, 8)),
]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _bf16_f64(x) -> np.ndarray:
    """`x` rounded to bf16, as float64."""
    return np.asarray(jnp.asarray(x).astype(BF16), np.float64)


@pytest.mark.parametrize("spec,a_shape,b_shape", SPECS)
def test_values_and_gradients_are_bf16_products_with_float32_sums(spec, a_shape, b_shape):
    r = np.random.default_rng(0)
    a = jnp.asarray(r.normal(size=a_shape), F32)
    b = jnp.asarray(r.normal(size=b_shape), BF16)  # a bf16 operand gets a bf16 gradient, a float32 one float32
    cot = r.normal(size=np.einsum(spec, np.zeros(a_shape), np.zeros(b_shape)).shape).astype(np.float32)
    y, pullback = jax.vjp(lambda a, b: mixed_einsum(spec, a, b, BF16), a, b)
    da, db = jax.jit(pullback)(jnp.asarray(cot))
    assert (y.dtype, da.dtype, db.dtype) == (F32, F32, BF16)
    # Exactly the float64 products of the bf16-rounded operands (and cotangent), up to float32 summation.
    ins, out = spec.split("->")
    left, right = ins.split(",")
    np.testing.assert_allclose(np.asarray(y), np.einsum(spec, _bf16_f64(a), _bf16_f64(b)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(da), np.einsum(f"{out},{right}->{left}", _bf16_f64(cot), _bf16_f64(b)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db, np.float32),
                               np.einsum(f"{left},{out}->{right}", _bf16_f64(a), _bf16_f64(cot)), rtol=1e-2, atol=1e-2)
    # And within bf16 tolerance of the float32 computation.
    ref_y, ref_pullback = jax.vjp(lambda a, b: jnp.einsum(spec, a, b, precision="highest"), a, b.astype(F32))
    for got, want in zip((y, da, db), (ref_y, *ref_pullback(jnp.asarray(cot)))):
        assert _rel(got, want) < BF16_RTOL


def test_sums_accumulate_in_float32_both_ways():
    """4096 products of ones, summed forward (over k) and backward (over m): a bf16 sum would stall at 256."""
    y = jax.jit(lambda a, b: mixed_einsum("mk,kn->mn", a, b, BF16))(jnp.ones((1, 4096)), jnp.ones((4096, 1)))
    assert float(y[0, 0]) == 4096.0
    grad_b = jax.jit(jax.grad(lambda b: jnp.sum(mixed_einsum("mk,kn->mn", jnp.ones((4096, 1)), b, BF16))))
    assert float(grad_b(jnp.ones((1, 1)))[0, 0]) == 4096.0


def test_rejects_specs_that_are_not_matmuls():
    x = jnp.ones((3, 4))
    for spec in ("ab,bc->a", "aa,ab->b", "ab,bc->acd"):
        with pytest.raises(ValueError, match="matmul-like"):
            mixed_einsum(spec, x, x, BF16)
    assert contraction_spec(4, 2, 1) == "abcd,cde->abe"


def _layers(dtype, lora=None):
    """Three q/k/v-like layers from the same seeds in `dtype` (float32 params), biases and LoRA B non-zero."""
    out = []
    for seed in range(3):
        layer = L.Dense(16, (4, 8), in_axes=("embed",), out_axes=("heads", "kv"), dtype=dtype, lora=lora,
                        rngs=nnx.Rngs(seed))
        layer.bias[...] = jax.random.normal(jax.random.key(seed + 10), layer.bias.shape)
        if lora is not None:
            layer.lora_b[...] = jax.random.normal(jax.random.key(seed + 20), layer.lora_b.shape)
        out.append(layer)
    return nnx.List(out)


COT = jax.random.normal(jax.random.key(5), (2, 5, 4, 8))  # a fixed cotangent for every output


def _loss(layers, x, terms=lambda v: v):
    """sum(COT * y) over every layer's output, computed fused and separately (`terms`: applied to each product)."""
    outs = list(L.fused_dense(layers, x)) + [layer(x) for layer in layers]
    return sum(jnp.sum(terms(COT * y.astype(F32))) for y in outs)


def _uses_custom_vjp(fn, *args) -> bool:
    return "custom_vjp" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=2, alpha=4.0, dropout=0.0)])
def test_bf16_layers_take_the_mixed_path_and_match_float32(lora):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    assert uses_mixed_matmul(BF16) == (jax.default_backend() == "cpu") and not uses_mixed_matmul(F32)
    bf16, f32 = _layers(BF16, lora), _layers(F32, lora)
    assert _uses_custom_vjp(lambda x: _loss(bf16, x), x) == uses_mixed_matmul(BF16)
    loss, grads = nnx.jit(nnx.value_and_grad(_loss))(bf16, x)
    ref_loss, ref_grads = nnx.jit(nnx.value_and_grad(_loss))(f32, x)
    assert abs(float(loss) - float(ref_loss)) < BF16_RTOL * float(_loss(f32, x, jnp.abs))
    names = ("kernel", "bias") + (("lora_a", "lora_b") if lora else ())
    for i in range(len(bf16)):
        g, ref = grads[i], ref_grads[i]
        for name in names:
            got, want = getattr(g, name)[...], getattr(ref, name)[...]
            assert got.dtype == F32, name  # float32 master weights get float32 gradients
            assert _rel(got, want) < BF16_RTOL, name


def test_float32_takes_the_plain_path_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    lora = LoRAConfig(rank=2, alpha=4.0, dropout=0.0)
    layers = _layers(F32, lora)
    assert not _uses_custom_vjp(lambda x: _loss(layers, x), x)
    layer = layers[0]
    base = jax.lax.dot_general(x, layer.kernel[...], (((2,), (0,)), ((), ()))) + layer.bias[...]
    branch = jnp.tensordot(jax.lax.dot_general(x, layer.lora_a[...], (((2,), (0,)), ((), ()))), layer.lora_b[...],
                           axes=1) * jnp.asarray(layer.lora.scale, F32)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(base + branch))
    q = jax.random.normal(jax.random.key(1), (2, 6, 4, 8))
    assert not _uses_custom_vjp(lambda q: L.dot_product_attention(q, q, q, implementation="explicit"), q)
    np.testing.assert_array_equal(np.asarray(L.activation("gelu")(x)), np.asarray(jax.nn.gelu(x, approximate=False)))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "quick_gelu"])
def test_bf16_activations_are_float32_rounded_once(name):
    x = jax.random.normal(jax.random.key(0), (64, 32)) * 3
    fn = L.activation(name)
    # bf16 GELU is evaluated in its erf form (cheaper on XLA CPU); float32 keeps jax.nn.gelu's erfc form.
    form = L.gelu_erf if name == "gelu" else fn
    xb = x.astype(BF16)
    y, grad = jax.value_and_grad(lambda v: jnp.sum(fn(v).astype(F32) * x))(xb)
    y_ref, grad_ref = jax.value_and_grad(lambda v: jnp.sum(form(v).astype(BF16).astype(F32) * x))(xb.astype(F32))
    np.testing.assert_array_equal(np.asarray(fn(xb)), np.asarray(form(xb.astype(F32)).astype(BF16)))
    assert fn(xb).dtype == BF16 and grad.dtype == BF16
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad_ref.astype(BF16)))
    assert float(y) == float(y_ref)
    # Within bf16 rounding of the float32 activation (one bf16 step where the two float32 forms straddle a tie).
    np.testing.assert_allclose(np.asarray(fn(xb), np.float32), np.asarray(fn(xb.astype(F32))), rtol=2 ** -7,
                               atol=1e-6)
