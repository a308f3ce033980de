"""Small building blocks shared by the Flax NNX ports (ViT, Q-Former, ...).

Everything here is generic: parameters carry logical axis names (see ``idmr_jax.sharding.DEFAULT_RULES``),
the compute dtype is separate from the parameter dtype, and numerically sensitive reductions (LayerNorm
statistics, softmax) run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idmr_jax.models.mixed_matmul import contraction_spec, matmul_accumulator, mixed_einsum, uses_mixed_matmul
from idmr_jax.sharding import compute_sharding, sharded_cast

Shape = int | Sequence[int]
Axes = Sequence[str | None]
DType = Any

# ----------------------------------------------------------------------------------------------
# Initialisers and parameter creation.


def trunc_normal(std: float = 0.02) -> Callable:
    """Truncated normal (at +-2 std) initialiser, the ViT/BERT default."""
    return jax.nn.initializers.truncated_normal(stddev=std)


def kaiming_uniform_a_sqrt5(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32,
                            *, fan_in: int) -> jax.Array:
    """torch ``kaiming_uniform_(w, a=sqrt(5))`` on a ``[r, fan_in]`` weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    PEFT's init of a LoRA ``A`` matrix; it lives here, next to :class:`Dense` that creates the adapter, so that
    ``models.lora`` (which imports ``Dense``) is not imported back by this module."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, minval=-bound, maxval=bound)


def make_param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype: DType) -> nnx.Param:
    """Creates an ``nnx.Param`` with logical axis names (one per dimension) as sharding metadata."""
    shape = tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {shape} needs {len(shape)} logical axis names, got {tuple(axes)}")
    return nnx.Param(nnx.with_partitioning(init, tuple(axes))(rngs.params(), shape, dtype))


def _as_tuple(x: Shape) -> tuple[int, ...]:
    return (int(x),) if isinstance(x, int | np.integer) else tuple(int(v) for v in x)


def to_precision(precision: str | jax.lax.Precision | None) -> jax.lax.Precision | None:
    """Maps "default"/"high"/"highest" (config-friendly strings) to ``jax.lax.Precision``."""
    if precision is None or isinstance(precision, jax.lax.Precision):
        return precision
    return jax.lax.Precision[str(precision).upper()]


# ----------------------------------------------------------------------------------------------
# Layers.


class Dense(nnx.Module):
    """A linear layer over possibly multi-dimensional feature shapes, with logical axis names.

    ``kernel`` has shape ``in_features + out_features`` (e.g. ``[embed, heads, head_dim]`` for a
    per-head projection), so tensor parallelism can shard whole heads; ``bias`` has ``out_features``.
    Inputs are contracted over their last ``len(in_features)`` dimensions.
    With ``lora`` (an ``idmr_jax.models.lora.LoRAConfig``) the layer also holds float32 ``lora_a``
    ``[*in, r]`` / ``lora_b`` ``[r, *out]`` and adds ``dropout(x) A B * scale`` (see ``idmr_jax.models.lora``);
    `deterministic` only matters for that dropout.
    """

    def __init__(
        self,
        in_features: Shape,
        out_features: Shape,
        *,
        in_axes: Axes,
        out_axes: Axes,
        use_bias: bool = True,
        dtype: DType | None = None,
        param_dtype: DType = jnp.float32,
        precision: str | jax.lax.Precision | None = None,
        kernel_init: Callable = trunc_normal(0.02),
        bias_init: Callable = jax.nn.initializers.zeros,
        lora: Any = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.dtype = dtype
        self.precision = to_precision(precision)
        self.kernel = make_param(
            rngs, kernel_init, self.in_features + self.out_features, tuple(in_axes) + tuple(out_axes), param_dtype)
        self.bias = make_param(rngs, bias_init, self.out_features, out_axes, param_dtype) if use_bias else None
        # Optional LoRA (an idmr_jax.models.lora.LoRAConfig): without it the params and outputs are unchanged.
        self.lora = lora
        if lora is not None:
            self._init_lora(lora, in_axes, out_axes, rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        n_in = len(self.in_features)
        if x.shape[-n_in:] != self.in_features:
            raise ValueError(f"Dense expects trailing dims {self.in_features}, got input {x.shape}")
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = _project(x, self.kernel[...], None if self.bias is None else self.bias[...], n_in, dtype, self.precision,
                     compute_sharding(self.kernel, dtype))
        return self.add_lora(y, x, deterministic=deterministic).astype(dtype)

    def _init_lora(self, lora, in_axes: Axes, out_axes: Axes, rngs: nnx.Rngs) -> None:
        r, pdt = int(lora.rank), jnp.dtype(lora.param_dtype)
        fan_in = int(np.prod(self.in_features))
        # PEFT: A ~ kaiming_uniform(a=sqrt(5)) of the [r, in] torch weight, B = 0 (a fresh adapter is a no-op).
        self.lora_a = make_param(rngs, functools.partial(kaiming_uniform_a_sqrt5, fan_in=fan_in),
                                 self.in_features + (r,), tuple(in_axes) + (None,), pdt)
        self.lora_b = make_param(rngs, jax.nn.initializers.zeros, (r,) + self.out_features, (None,) + tuple(out_axes),
                                 pdt)
        self.lora_dropout = nnx.Dropout(float(lora.dropout), rngs=rngs) if lora.dropout > 0 else None
        self.lora_merged = False  # set by lora.merge: the delta then lives in `kernel`

    def add_lora(self, y: jax.Array, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """`y` (this layer's base output for input `x`) plus the LoRA adapter's ``dropout(x) A B * scale``, in y's
        dtype; `y` unchanged without an adapter or once it is merged into ``kernel``. Shared by :func:`fused_dense`,
        which computes the base outputs of several layers in one matmul."""
        if self.lora is None or self.lora_merged:
            return y
        return y + self._lora_branch(x, deterministic).astype(y.dtype)

    def _lora_branch(self, x: jax.Array, deterministic: bool) -> jax.Array:
        # In the LoRA config's compute dtype (None: the layer's); the result joins the base output in x's dtype.
        out_dtype = x.dtype
        dtype = jnp.dtype(self.lora.dtype or x.dtype)
        x = x.astype(dtype)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x, deterministic=deterministic)
        n_in, n_out = len(self.in_features), len(self.out_features)
        a_sharding, b_sharding = compute_sharding(self.lora_a, dtype), compute_sharding(self.lora_b, dtype)
        if uses_mixed_matmul(dtype):  # as in _project: bf16 products with float32 accumulation, both passes
            h = mixed_einsum(contraction_spec(x.ndim, n_in, 1), x, self.lora_a[...], dtype, self.precision, a_sharding)
            y = mixed_einsum(contraction_spec(h.ndim, 1, n_out), h, self.lora_b[...], dtype, self.precision, b_sharding)
        else:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            a, b = sharded_cast(self.lora_a[...], dtype, a_sharding), sharded_cast(self.lora_b[...], dtype, b_sharding)
            h = jax.lax.dot_general(x, a, (contract, ((), ())), precision=self.precision)
            y = jnp.tensordot(h, b, axes=1, precision=self.precision)
        return (y * jnp.asarray(self.lora.scale, y.dtype)).astype(out_dtype)


def fused_dense(denses: Sequence[Dense], x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, ...]:
    """``tuple(d(x) for d in denses)`` computed with one matmul: the kernels are stacked at compute time into
    ``[*in, n, *out]`` (and the biases into ``[n, *out]``), so a fused Q/K/V or K/V projection needs no change of
    the parameter tree (converters, checkpoints and exports see the separate layers). The stacked axis sits in
    front of the output axes, so sharded head axes stay sharded. LoRA adapters are added per layer, in order.
    Layers that differ in input/output shape, dtype, precision or bias fall back to separate calls."""
    first = denses[0]
    if len(denses) == 1 or any(
            (d.in_features, d.out_features, d.dtype, d.precision, d.bias is None)
            != (first.in_features, first.out_features, first.dtype, first.precision, first.bias is None)
            for d in denses):
        return tuple(d(x, deterministic=deterministic) for d in denses)
    n_in = len(first.in_features)
    if x.shape[-n_in:] != first.in_features:
        raise ValueError(f"Dense expects trailing dims {first.in_features}, got input {x.shape}")
    dtype = first.dtype or x.dtype
    x = x.astype(dtype)
    # Stacked in the parameter dtype: _project casts (on the mixed path a float32 kernel gets a float32 gradient).
    kernel = jnp.stack([d.kernel[...] for d in denses], axis=n_in)
    bias = None if first.bias is None else jnp.stack([d.bias[...] for d in denses])
    y = _project(x, kernel, bias, n_in, dtype, first.precision, compute_sharding(first.kernel, dtype, stacked_at=n_in))
    stacked_axis = x.ndim - n_in
    outs = []
    for i, d in enumerate(denses):
        out = jax.lax.index_in_dim(y, i, axis=stacked_axis, keepdims=False)
        outs.append(d.add_lora(out, x, deterministic=deterministic).astype(dtype))
    return tuple(outs)


def _project(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, n_in: int, dtype: DType,
             precision: jax.lax.Precision | None, kernel_sharding: Any = None) -> jax.Array:
    """``x . kernel + bias`` (`x`'s last `n_in` dims against `kernel`'s first) in `dtype`, returned in
    :func:`matmul_accumulator`'s dtype (the caller rounds to `dtype` once, after any other addend). 16-bit on CPU:
    :func:`mixed_einsum`, whose backward products also run in `dtype` with float32 accumulation. The kernel's
    `dtype` copy keeps `kernel_sharding` (``sharding.compute_sharding``: all-gathered in `dtype`, not float32)."""
    if uses_mixed_matmul(dtype):
        y = mixed_einsum(contraction_spec(x.ndim, n_in, kernel.ndim - n_in), x, kernel, dtype, precision,
                         kernel_sharding)
    else:
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, sharded_cast(kernel, dtype, kernel_sharding), (contract, ((), ())),
                                precision=precision)
    return y if bias is None else y + bias.astype(y.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; statistics in float32 (two-pass variance, as torch), output in `dtype`."""

    def __init__(self, features: int, *, eps: float = 1e-5, axes: Axes = ("embed",), dtype: DType | None = None,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.eps = float(eps)
        self.dtype = dtype
        self.scale = make_param(rngs, jax.nn.initializers.ones, (features,), axes, param_dtype)
        self.bias = make_param(rngs, jax.nn.initializers.zeros, (features,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centered = x32 - mean
        var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Activations (names as in transformers' ACT2FN where they coincide).


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def rounded_once(fn: Callable[[jax.Array], jax.Array],
                 float32_form: Callable[[jax.Array], jax.Array] | None = None) -> Callable[[jax.Array], jax.Array]:
    """`fn` computed in float32 on 16-bit float inputs (by `float32_form` where given: the same function written
    to be cheaper, for inputs whose result is rounded to 16 bits anyway) and rounded once to their dtype; other
    inputs go through `fn` unchanged. XLA's CPU backend evaluates bf16 elementwise ops op by op through float32 and
    is slower on them than on float32 (exact GELU on 2056x1024: 14.5 vs 5.2 ms, BENCHMARKS.md section 1), and each
    bf16 intermediate would cost accuracy; on TPU/GPU the converts fuse into the same elementwise kernel."""

    @functools.wraps(fn)
    def in_float32(x: jax.Array) -> jax.Array:
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4:
            return (float32_form or fn)(x.astype(jnp.float32)).astype(x.dtype)
        return fn(x)

    return in_float32


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU as torch writes it, ``0.5 x (1 + erf(x / sqrt 2))``: on XLA CPU 2.3x cheaper than
    ``jax.nn.gelu``'s ``erfc`` form, which float32 inputs keep (their numbers stay as they were). They differ by
    float32 rounding only (``1 + erf`` is off by up to 6e-8 absolute, which matters in relative terms only in the
    far negative tail, where GELU is below 1e-6): after rounding to bf16, in ties only."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # exact erf GELU (torch nn.GELU default)
    "gelu": rounded_once(functools.partial(jax.nn.gelu, approximate=False), float32_form=gelu_erf),
    "gelu_tanh": rounded_once(functools.partial(jax.nn.gelu, approximate=True)),
    "quick_gelu": rounded_once(quick_gelu),
    "relu": jax.nn.relu,  # exact in any dtype
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by name, with a clear error for unknown names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# ----------------------------------------------------------------------------------------------
# Attention.

ATTENTION_IMPLEMENTATIONS = ("explicit", "xla", "cudnn")


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    precision: str | jax.lax.Precision | None = None,
    probs_dropout: Callable[[jax.Array], jax.Array] | None = None,
    return_probs: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multi-head attention ``softmax(q k^T * scale + bias) v`` on ``[batch, length, heads, head_dim]`` inputs.

    `key`/`value` may have fewer heads than `query` (grouped-query attention): query head ``n`` reads kv head
    ``n // (heads // kv_heads)``, as transformers' ``repeat_kv``. The logits are accumulated, biased and
    soft-maxed in float32 whatever the input dtype (bf16 logits lose the small differences a long sequence or a
    large bias depends on); the probabilities are cast to the value dtype for the second matmul.

    `bias`: additive float logits bias broadcastable to ``[batch, heads, q_length, kv_length]``, added in float32
    after the scaling (AdaFocal's ``beta * M_B``). `mask`: boolean, broadcastable likewise, False = excluded
    whatever the bias. `is_causal`: query ``i`` sees keys ``j <= i``. `scale` defaults to ``head_dim ** -0.5``;
    a scale of exactly 1.0 is not multiplied in (callers that pre-scale q keep their logits bit for bit).
    `probs_dropout` (attention dropout while training) is applied to the float32 probabilities; `return_probs`
    also returns them ``[batch, heads, q_length, kv_length]``.

    `implementation` (None = automatic): "explicit" is written out here and is the only one that can drop out or
    return probabilities; "xla" and "cudnn" are ``jax.nn.dot_product_attention``'s (same float32 logits and
    softmax; "cudnn" is the fused flash kernel, bf16/fp16 only). Automatic: "explicit" when dropout or the
    probabilities are needed or on CPU (where jax's XLA path measured slower in the backward pass, see
    BENCHMARKS.md "Step speed changes"), "cudnn" on a GPU when :func:`cudnn_attention_supported`, else "xla".
    Returns ``[batch, q_length, heads, head_dim]`` in the value dtype (and the probabilities with `return_probs`).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    explicit_needed = return_probs or probs_dropout is not None
    if implementation is None:
        implementation = _auto_implementation(query, key, bias, mask, explicit_needed)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "explicit":
        out, probs = _explicit_attention(query, key, value, bias, mask, is_causal, scale, to_precision(precision),
                                         probs_dropout)
        return (out, probs) if return_probs else out
    if explicit_needed:
        raise ValueError(f"the {implementation!r} attention can neither drop out nor return probabilities")
    bias = None if bias is None else jnp.asarray(bias, jnp.float32)
    if implementation == "cudnn" and mask is not None:  # cuDNN takes a mask only as a full [.., T, S] bias
        mask = jnp.asarray(mask)
        mask = jnp.broadcast_to(mask, (1,) * (4 - mask.ndim) + mask.shape[:-2] + (query.shape[1], key.shape[1]))
    precision = to_precision(precision)
    # jax's XLA path takes no precision argument; its float32 matmuls follow the default precision instead.
    context = (contextlib.nullcontext() if precision is None
               else jax.default_matmul_precision(precision.name.lower()))
    with context:
        return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, is_causal=is_causal,
                                            scale=scale, implementation=implementation)


def cudnn_attention_supported(query: jax.Array, key: jax.Array, bias: jax.Array | None,
                              mask: jax.Array | None) -> bool:
    """Whether the automatic choice may use cuDNN's fused attention for these inputs: a GPU, bf16/fp16 inputs,
    head_dim a multiple of 8 and at most 128, no float bias (cuDNN would round it to the input dtype; a float32
    bias such as AdaFocal's ``beta * M_B`` goes through XLA) and, with a mask (which cuDNN adds as a bias), even
    sequence lengths (cuDNN's training kernel refuses odd ones)."""
    if jax.default_backend() != "gpu" or query.dtype not in (jnp.bfloat16, jnp.float16) or key.dtype != query.dtype:
        return False
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 128 or bias is not None:
        return False
    return mask is None or (query.shape[1] % 2 == 0 and key.shape[1] % 2 == 0)


def _auto_implementation(query, key, bias, mask, explicit_needed: bool) -> str:
    if explicit_needed or jax.default_backend() == "cpu":
        return "explicit"
    return "cudnn" if cudnn_attention_supported(query, key, bias, mask) else "xla"


def _explicit_attention(query, key, value, bias, mask, is_causal: bool, scale: float, precision, probs_dropout):
    """The attention written out (see :func:`dot_product_attention`); returns (output, float32 probabilities)."""
    b, t, heads, _ = query.shape
    s, kv_heads = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    group = heads // kv_heads
    mixed = uses_mixed_matmul(value.dtype) and query.dtype == key.dtype == value.dtype
    if mixed:
        # Heads-major [b, kv_heads, group * t, d] (query head n reads kv head n // group, as below): the batch dims
        # lead both products, forward and backward, as mixed_einsum needs.
        q = query.transpose(0, 2, 1, 3).reshape(b, kv_heads, group * t, -1)
        k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
        logits = mixed_einsum("bkqd,bksd->bkqs", q, k, value.dtype, precision).reshape(b, heads, t, s)
    elif group == 1:
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=precision, preferred_element_type=jnp.float32)
    else:  # grouped-query attention without materialising repeated keys/values
        grouped = query.reshape(b, t, kv_heads, group, query.shape[-1])
        logits = jnp.einsum("bqkgd,bskd->bkgqs", grouped, key, precision=precision,
                            preferred_element_type=jnp.float32).reshape(b, heads, t, s)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    if is_causal:
        mask = _causal(t, s) if mask is None else mask & _causal(t, s)
    if mask is not None:
        # `where`, not an additive mask: no bias, however large, can re-open an excluded key.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    weights = (probs if probs_dropout is None else probs_dropout(probs)).astype(value.dtype)
    acc = matmul_accumulator(value.dtype)
    if mixed:
        out = mixed_einsum("bkqs,bksd->bkqd", weights.reshape(b, kv_heads, group * t, s), v, value.dtype, precision)
        out = out.astype(value.dtype).reshape(b, heads, t, -1).transpose(0, 2, 1, 3)
    elif group == 1:
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value, precision=precision, preferred_element_type=acc)
    else:
        weights = weights.reshape(b, kv_heads, group, t, s)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value, precision=precision,
                         preferred_element_type=acc).reshape(b, t, heads, -1)
    return out.astype(value.dtype), probs


def _causal(q_len: int, kv_len: int) -> jax.Array:
    """``[1, 1, q_len, kv_len]`` lower-triangular keep mask (query i sees keys j <= i), as jax's ``is_causal``."""
    return jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]


# ----------------------------------------------------------------------------------------------
# Resizing of learned position tables.


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``[out_size, in_size]`` matrix of ``torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)`` along one axis (Keys kernel with A = -0.75, border-replicated taps).

    Used to resize learned position embeddings exactly as transformers' ``interpolate_pos_encoding`` does
    (``jax.image.resize`` uses A = -0.5 and antialiasing, which would not match converted checkpoints).
    """
    a = -0.75
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        # torch does not clamp the source coordinate to >= 0 for cubic modes; the taps are clamped instead.
        src = (i + 0.5) * scale - 0.5
        base = int(np.floor(src))
        t = src - base
        weights = (
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
        )
        for k, w in enumerate(weights):
            m[i, min(max(base - 1 + k, 0), in_size - 1)] += w
    return m


def resize_grid_embedding(table: jax.Array, in_grid: tuple[int, int], out_grid: tuple[int, int]) -> jax.Array:
    """Bicubically resizes a ``[gh*gw, dim]`` row-major grid of embeddings to ``out_grid`` (torch semantics)."""
    if tuple(in_grid) == tuple(out_grid):
        return table
    rows = jnp.asarray(torch_bicubic_matrix(in_grid[0], out_grid[0]), jnp.float32)
    cols = jnp.asarray(torch_bicubic_matrix(in_grid[1], out_grid[1]), jnp.float32)
    grid = table.reshape(in_grid[0], in_grid[1], table.shape[-1]).astype(jnp.float32)
    out = jnp.einsum("hH,wW,HWd->hwd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(out_grid[0] * out_grid[1], table.shape[-1]).astype(table.dtype)
