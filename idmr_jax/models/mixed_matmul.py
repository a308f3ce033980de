"""Mixed-precision matmuls: 16-bit inputs with float32 accumulation in the forward AND the backward pass.

Why this exists (BENCHMARKS.md section 1): XLA's CPU backend has no bf16-output dot, so its float-normalization
pass turns a ``bf16 x bf16 -> bf16`` dot into a float32 dot between converts, slower than plain float32. A dot
written as ``bf16 x bf16 -> float32`` (``preferred_element_type``) stays in bf16 and runs on the CPU's matrix
units (AMX), several times faster. The forward pass can ask for that directly; the backward pass cannot: JAX's
transpose of such a dot receives a float32 cotangent and multiplies in float32 again. :func:`mixed_einsum` is a
``custom_vjp`` whose two backward products also take 16-bit inputs (the cotangent rounded to the compute dtype)
and accumulate in float32, and whose gradients come back in the dtypes of the primal inputs (a float32 master
weight gets a float32 gradient, not a bf16 one).

Only the CPU takes this path (:func:`uses_mixed_matmul`): TPU and GPU matrix units accumulate in float32 whatever
the output dtype, and XLA keeps their backward products in bf16 natively, so they stay on the plain dots.

Caveat (found while measuring): a ``bf16 x bf16 -> float32`` dot that XLA's CPU backend does not hand to its YNN
library fails at run time (``Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32``); dots whose
batch dimensions are not leading are such dots. Specs given to :func:`mixed_einsum` must keep the batch
dimensions leading in both operands and in the output, in the same order; the backward specs then do too.
"""

from __future__ import annotations

import functools
import string
from typing import Any

import jax
import jax.numpy as jnp

from idmr_jax.sharding import gathered_for_use

DType = Any


def matmul_accumulator(dtype: DType) -> jnp.dtype | None:
    """The ``preferred_element_type`` of a matmul that computes in `dtype`: float32 for 16-bit floats on CPU, else
    None (the inputs' dtype). XLA's CPU backend runs bf16 x bf16 -> float32 products on AMX (YNNPACK) but turns
    bf16 x bf16 -> bf16 products into float32 matmuls, slower than plain float32 (BENCHMARKS.md, section 1);
    TPU and GPU matrix units accumulate in float32 whatever the output dtype. Either way the products are
    accumulated in float32 and rounded once to `dtype`."""
    low = jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4
    return jnp.dtype(jnp.float32) if low and jax.default_backend() == "cpu" else None


def uses_mixed_matmul(dtype: DType) -> bool:
    """Whether matmuls computing in `dtype` go through :func:`mixed_einsum` (16-bit floats on CPU)."""
    return matmul_accumulator(dtype) is not None


def contraction_spec(ndim: int, n_in: int, n_out: int) -> str:
    """The einsum spec of a dense projection: an ``ndim``-dimensional input contracted over its last `n_in`
    dimensions with a ``[*in, *out]`` kernel of ``n_in + n_out`` dimensions, e.g. ``"abc,cde->abde"``."""
    letters = string.ascii_letters
    lead, inner = letters[:ndim - n_in], letters[ndim - n_in:ndim]
    outer = letters[ndim:ndim + n_out]
    return f"{lead}{inner},{inner}{outer}->{lead}{outer}"


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, dtype: DType,
                 precision: jax.lax.Precision | None = None, b_sharding: Any = None) -> jax.Array:
    """``einsum(spec, a, b)`` of `a` and `b` rounded to the 16-bit `dtype`, accumulated and returned in float32
    (the caller rounds once, after any addend). The gradients are computed the same way: the float32 cotangent is
    rounded to `dtype`, each backward product accumulates in float32 and is returned in its input's own dtype.

    `spec` is a two-operand einsum without repeated or operand-only (summed-out) indices, batch dimensions
    leading in both operands and the output (see the module docstring).

    `b_sharding` (a ``NamedSharding`` or None, see ``idmr_jax.sharding.compute_sharding``): the 16-bit copy of `b`
    (a weight) keeps that sharding, so an fsdp-sharded float32 weight is cast shard by shard and all-gathered in
    16 bits; its gradient is constrained to it in `b`'s own dtype (a float32 weight's gradient is reduced across
    devices in float32)."""
    ins, out = spec.split("->")
    left, right = ins.split(",")
    for name, idx, others in ((left, left, right + out), (right, right, left + out), (out, out, left + right)):
        if len(set(idx)) != len(idx) or not set(idx) <= set(others):
            raise ValueError(f"mixed_einsum needs a matmul-like spec; {spec!r} repeats or sums out {name!r}")
    return _mixed_einsum(spec, jnp.dtype(dtype), precision, jnp.dtype(a.dtype), jnp.dtype(b.dtype), b_sharding, a, b)


def _product(spec: str, a: jax.Array, b: jax.Array, precision) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _constrained(x: jax.Array, sharding) -> jax.Array:
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _for_use(b: jax.Array, sharding) -> jax.Array:
    return b if sharding is None else gathered_for_use(b, sharding)


# The primal dtypes travel as static arguments: the backward pass returns each gradient in its input's dtype.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _mixed_einsum(spec, dtype, precision, a_dtype, b_dtype, b_sharding, a, b):
    a, b = a.astype(dtype), _constrained(b.astype(dtype), b_sharding)
    return _product(spec, a, _for_use(b, b_sharding), precision)


def _mixed_einsum_fwd(spec, dtype, precision, a_dtype, b_dtype, b_sharding, a, b):
    # The 16-bit copies are the residuals (half a float32 copy's memory); b's in its own sharding, as it is stored
    # (the backward gathers it again rather than keep a gathered copy from the forward to the backward pass).
    a, b = a.astype(dtype), _constrained(b.astype(dtype), b_sharding)
    return _product(spec, a, _for_use(b, b_sharding), precision), (a, b)


def _mixed_einsum_bwd(spec, dtype, precision, a_dtype, b_dtype, b_sharding, residuals, g):
    a, b = residuals
    ins, out = spec.split("->")
    left, right = ins.split(",")
    g = g.astype(dtype)
    da = _product(f"{out},{right}->{left}", g, _for_use(b, b_sharding), precision).astype(a_dtype)
    db = _constrained(_product(f"{left},{out}->{right}", a, g, precision).astype(b_dtype), b_sharding)
    return da, db


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)
