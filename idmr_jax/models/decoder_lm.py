"""Decoder-only language models (Qwen2, Llama) as one Flax NNX module, with transformers' semantics.

:class:`DecoderLM` follows transformers 5.23 ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``: token embedding ->
``num_layers`` pre-RMSNorm blocks (causal GQA self-attention with rotary positions, SwiGLU MLP) -> final
RMSNorm; ``logits`` applies ``lm_head`` (or the embedding matrix when ``tie_word_embeddings``).

* RMSNorm: statistics in float32, ``weight * normed.astype(input dtype)`` as transformers.
* RoPE: default rope only (``inv_freq = theta ** -(2i / head_dim)``, rotate-half layout); other
  ``rope_scaling`` / ``rope_parameters`` types are rejected by the config translators
  (:mod:`idmr_jax.weights.decoder_lm`).
  With ``mrope_section`` (Qwen2-VL's M-RoPE, :func:`idmr_jax.models.rotary.mrope_cos_sin`) ``position_ids`` may be
  ``[3, B, T]`` (temporal, height, width rows; ``[B, T]`` means three equal rows, i.e. the 1D rope); without it
  (None, the default) the rope is the 1D one, unchanged.
* Biases: Qwen2 has q/k/v biases and a bias-free o_proj (``attention_bias`` defaults to True for "qwen2");
  Llama's ``attention_bias`` puts a bias on all four projections and ``mlp_bias`` on the MLP.
* ``attention_mask`` ``[B, T]`` (1 = token, 0 = padding, left or right) masks keys; causal masking always.
* Default ``position_ids`` are ``arange(T)`` for every row, whatever the padding: that is what transformers'
  forward does when ``position_ids`` is None. Rotary attention only sees position differences, so a
  left-padded row still gives the hidden states of the unpadded sequence (up to float rounding).
  ``generate`` (transformers' and :meth:`DecoderLM.generate_greedy`) instead uses
  :func:`idmr_jax.models.rotary.positions_from_mask` (``cumsum(mask) - 1``, 0 on padding).
* Generation: :meth:`DecoderLM.generate_greedy` (one jitted loop, KV cache via :meth:`DecoderLM.forward_cached`);
  :meth:`DecoderLM.score_tokens` gives next-token log-probabilities (P("Yes") reranking).

Flax param paths (unscanned; with ``scan=True`` ``layers/{i}/X`` becomes ``layers/X`` with a leading "layers"
axis)::

    embed_tokens/embedding                      [V, D]          (vocab, embed)
    layers/{i}/input_layernorm/scale            [D]             (embed)
    layers/{i}/self_attn/q_proj/kernel          [D, H, Dh]      (embed, heads, kv); bias [H, Dh]
    layers/{i}/self_attn/{k,v}_proj/kernel      [D, KV, Dh]     (embed, kv_heads, kv); bias [KV, Dh]
    layers/{i}/self_attn/o_proj/kernel          [H, Dh, D]      (heads, kv, embed); bias [D] (llama + bias)
    layers/{i}/post_attention_layernorm/scale   [D]
    layers/{i}/mlp/{gate,up}_proj/kernel        [D, M]          (embed, mlp); bias [M] with mlp_bias
    layers/{i}/mlp/down_proj/kernel             [M, D]          (mlp, embed); bias [D] with mlp_bias
    norm/scale                                  [D]
    lm_head/kernel                              [D, V]          (embed, vocab), untied only

With ``cfg.lora`` every Dense whose short name matches ``cfg.lora.targets`` also holds ``lora_a`` / ``lora_b``
(see :mod:`idmr_jax.models.lora`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models.generation import greedy_loop
from idmr_jax.models import lora as lora_lib
from idmr_jax.models.lora import LoRAConfig
from idmr_jax.models.rotary import apply_rope, mrope_cos_sin, rope_cos_sin
from idmr_jax.sharding import constrain

FAMILIES = ("qwen2", "llama")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
    """Architecture and execution options of a :class:`DecoderLM` (transformers names in brackets).

    num_layers [num_hidden_layers], num_heads [num_attention_heads], num_kv_heads [num_key_value_heads],
    head_dim (None: hidden_size // num_heads). attention_bias None = the family default (qwen2: q/k/v biases;
    llama: none). dtype: compute dtype; param_dtype: base weights (LoRA factors use ``lora.param_dtype``).
    remat: "none" | "full" | "dots" | "dots_no_batch" (as :class:`idmr_jax.models.vit.ViTConfig`);
    scan: stack the layers and run them with ``nnx.scan``. precision: matmul precision (None | "highest" ...).
    mrope_section: Qwen2-VL's M-RoPE chunk widths (temporal, height, width; summing to head_dim / 2), or None
    for the 1D rope.
    """

    family: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    attention_bias: bool | None = None
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    lora: LoRAConfig | None = None
    initializer_range: float = 0.02
    precision: str | None = None
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                             "give head_dim explicitly")
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.family == "qwen2")
        if self.family == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise ValueError("qwen2 always has q/k/v biases and no MLP biases (attention_bias=True, mlp_bias=False)")
        if isinstance(self.lora, Mapping):  # e.g. from JSON
            object.__setattr__(self, "lora", LoRAConfig(**self.lora))
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
            if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.dim_per_head // 2:
                raise ValueError(f"mrope_section {self.mrope_section} must be 3 widths summing to head_dim / 2 = "
                                 f"{self.dim_per_head // 2}")

    @property
    def dim_per_head(self) -> int:
        """The per-head width actually used (``head_dim`` or hidden_size // num_heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads


# ----------------------------------------------------------------------------------------------
# Building blocks.


def attention_keep_mask(attention_mask: jax.Array | None, batch: int, q_len: int, kv_len: int | None = None,
                        q_offset: Any = None) -> jax.Array | None:
    """Boolean mask, broadcastable to ``[B, 1, q_len, kv_len]``, of the keys each query may attend to: not padding
    and, with `q_offset`, causal (query i sits at key column q_offset + i, which may be traced). Without
    `q_offset` the causal part is left to the attention's ``is_causal``; None means no restriction."""
    kv_len = q_len if kv_len is None else kv_len
    keep = None
    if q_offset is not None:
        keep = ((jnp.arange(q_len) + q_offset)[:, None] >= jnp.arange(kv_len)[None, :])[None, None]
    if attention_mask is not None:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(f"attention_mask must be [batch, length] = {(batch, kv_len)}, got {attention_mask.shape}")
        padding = attention_mask[:, None, None, :] > 0
        keep = padding if keep is None else keep & padding
    return keep


class RMSNorm(nnx.Module):
    """T5/Llama RMSNorm: float32 statistics, then ``weight * normed.astype(input dtype)``."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = float(eps)
        self.dtype = dtype
        self.scale = L.make_param(rngs, jax.nn.initializers.ones, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * y.astype(dtype)


def _dense(cfg: DecoderLMConfig, name: str, in_f, out_f, in_axes, out_axes, *, use_bias: bool,
           rngs: nnx.Rngs) -> L.Dense:
    return L.Dense(in_f, out_f, in_axes=in_axes, out_axes=out_axes, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                   kernel_init=jax.nn.initializers.normal(cfg.initializer_range),
                   lora=lora_lib.maybe(cfg.lora, name), rngs=rngs)


_ACT = ("batch", "length", "embed")
_HEADS = ("batch", "length", "heads", "kv")


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, cfg: DecoderLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        qkv_bias = cfg.attention_bias
        o_bias = cfg.attention_bias and cfg.family == "llama"  # Qwen2's o_proj never has a bias
        self.q_proj = _dense(cfg, "q_proj", d, (h, hd), ("embed",), ("heads", "kv"), use_bias=qkv_bias, rngs=rngs)
        self.k_proj = _dense(cfg, "k_proj", d, (kv, hd), ("embed",), ("kv_heads", "kv"), use_bias=qkv_bias, rngs=rngs)
        self.v_proj = _dense(cfg, "v_proj", d, (kv, hd), ("embed",), ("kv_heads", "kv"), use_bias=qkv_bias, rngs=rngs)
        self.o_proj = _dense(cfg, "o_proj", (h, hd), d, ("heads", "kv"), ("embed",), use_bias=o_bias, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None, *,
                 deterministic: bool, kv: tuple[jax.Array, jax.Array] | None = None, index: Any = None):
        """Attention output ``[B, T, D]``; `mask` from :func:`attention_keep_mask` (causal masking is added here
        without a cache). With a KV cache `kv` (``[B, S, KV, Dh]`` keys and values), the new keys/values are
        written at column `index` and attended to with everything before; returns ``(output, (keys, values))``
        then."""
        cfg = self.cfg
        # One matmul for q, k, v when they have the same head count, else one for k and v (layers.fused_dense:
        # the kernels are stacked at compute time, the params and their LoRA adapters stay separate).
        if cfg.num_heads == cfg.num_kv_heads:
            q, k, v = L.fused_dense((self.q_proj, self.k_proj, self.v_proj), x, deterministic=deterministic)
        else:
            q = self.q_proj(x, deterministic=deterministic)
            k, v = L.fused_dense((self.k_proj, self.v_proj), x, deterministic=deterministic)
        q = constrain(q, _HEADS)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
            kv = (k, v)
        # Grouped-query attention: head h reads kv head h // (heads // kv_heads), transformers' repeat_kv.
        kv_axes = ("batch", "length", "kv_heads", "kv")
        k, v = constrain(k, kv_axes), constrain(v, kv_axes)
        o = L.dot_product_attention(q, k, v, mask=mask, is_causal=kv is None, precision=cfg.precision)
        out = self.o_proj(constrain(o, _HEADS), deterministic=deterministic)
        return out if kv is None else (out, kv)


class Mlp(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DecoderLMConfig, *, rngs: nnx.Rngs):
        d, m, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = _dense(cfg, "gate_proj", d, m, ("embed",), ("mlp",), use_bias=b, rngs=rngs)
        self.up_proj = _dense(cfg, "up_proj", d, m, ("embed",), ("mlp",), use_bias=b, rngs=rngs)
        self.down_proj = _dense(cfg, "down_proj", m, d, ("mlp",), ("embed",), use_bias=b, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x, deterministic=deterministic)) * self.up_proj(x, deterministic=deterministic)
        return self.down_proj(constrain(h, ("batch", "length", "mlp")), deterministic=deterministic)


class DecoderLayer(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderLMConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype),
                                 param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = norm()
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask, *, deterministic: bool, kv=None, index=None):
        """The new hidden states; with a KV cache (see :class:`Attention`) ``(hidden, (keys, values))``."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, deterministic=deterministic, kv=kv,
                              index=index)
        if kv is not None:
            attn, kv = attn
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), deterministic=deterministic)
        x = constrain(x, _ACT)
        return x if kv is None else (x, kv)


def rotary_tables(cfg: DecoderLMConfig, position_ids: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[B, T, head_dim]`` for `position_ids`: ``[B, T]``, or ``[3, B, T]`` with ``cfg.mrope_section``
    (M-RoPE; ``[B, T]`` then stands for three equal rows)."""
    if cfg.mrope_section is None:
        if position_ids.ndim != 2:
            raise ValueError(f"position_ids must be [B, T] without mrope_section, got {position_ids.shape}")
        return rope_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta, dtype)
    if position_ids.ndim == 2:
        position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
    return mrope_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta, cfg.mrope_section, dtype)


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


# ----------------------------------------------------------------------------------------------
# The model.


class DecoderLM(nnx.Module):
    """Qwen2 / Llama causal LM; see the module docstring for semantics and param layout."""

    def __init__(self, cfg: DecoderLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embed_tokens = _Embedding(cfg, rngs=rngs)
        if cfg.scan:
            # As ViT's Encoder: a scan over split rngs builds `num_layers` independent layers with stacked params
            # (one layer's init temporaries at a time); transform_metadata prepends the "layers" logical axis.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.scan(in_axes=(0,), out_axes=0, length=cfg.num_layers,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.lm_head = None if cfg.tie_word_embeddings else _dense(
            cfg, "lm_head", cfg.hidden_size, cfg.vocab_size, ("embed",), ("vocab",), use_bias=False, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings ``[B, T, D]`` in the compute dtype."""
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, position_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        """Last hidden states ``[B, T, D]`` (after the final norm) = transformers' ``last_hidden_state``.

        Exactly one of `input_ids` ``[B, T]`` and `inputs_embeds` ``[B, T, D]``. `attention_mask` ``[B, T]``
        (1 real, 0 padding; None = no padding). `position_ids` ``[B, T]`` (or ``[3, B, T]`` with M-RoPE) default
        to ``arange(T)`` in every row, as transformers' forward (see the module docstring).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cfg = self.cfg
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        b, t = x.shape[:2]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        cos, sin = rotary_tables(cfg, position_ids, x.dtype)
        mask = attention_keep_mask(attention_mask, b, t)
        x = constrain(x, _ACT)

        def apply(layer, h, cos, sin, mask):
            return layer(h, cos, sin, mask, deterministic=deterministic)

        if cfg.remat != "none":
            apply = nnx.remat(apply, policy=_remat_policy(cfg.remat))
        if cfg.scan:
            def body(h, layer):
                return apply(layer, h, cos, sin, mask), None

            x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                            transform_metadata={nnx.PARTITION_NAME: "layers"})(x, self.layers)
        else:
            for layer in self.layers:
                x = apply(layer, x, cos, sin, mask)
        return self.norm(x)

    def forward_cached(self, inputs_embeds: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                       cache: tuple[jax.Array, jax.Array], index: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Inference step with a KV cache: hidden states ``[B, T, D]`` of `inputs_embeds` placed at cache columns
        ``index .. index+T-1``, and the updated cache.

        `cache`: keys and values ``[num_layers, B, S, KV, Dh]`` (:meth:`init_cache`); `attention_mask` ``[B, S]``
        over all cache columns (1 = a real token there); `position_ids` ``[B, T]`` (or ``[3, B, T]`` with
        M-RoPE). No dropout, no remat.
        """
        cfg = self.cfg
        x = constrain(inputs_embeds.astype(jnp.dtype(cfg.dtype)), _ACT)
        b, t = x.shape[:2]
        cos, sin = rotary_tables(cfg, position_ids, x.dtype)
        mask = attention_keep_mask(attention_mask, b, t, cache[0].shape[2], q_offset=index)

        def apply(layer, h, ck, cv):
            return layer(h, cos, sin, mask, deterministic=True, kv=(ck, cv), index=index)

        if cfg.scan:
            def body(h, layer, ck, cv):
                h, kv = apply(layer, h, ck, cv)
                return h, kv

            x, cache = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                                transform_metadata={nnx.PARTITION_NAME: "layers"})(x, self.layers, *cache)
        else:
            ks, vs = [], []
            for i, layer in enumerate(self.layers):
                x, (ck, cv) = apply(layer, x, cache[0][i], cache[1][i])
                ks.append(ck)
                vs.append(cv)
            cache = (jnp.stack(ks), jnp.stack(vs))
        return self.norm(x), cache

    def init_cache(self, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
        """Zero keys and values ``[num_layers, batch, length, num_kv_heads, head_dim]`` in the compute dtype."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.dim_per_head)
        return jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype))

    def logits(self, hidden: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """``[..., V]`` logits of hidden states (``lm_head``, or the embedding matrix when tied)."""
        if self.lm_head is not None:
            return self.lm_head(hidden, deterministic=deterministic)
        emb = self.embed_tokens.embedding[...].astype(hidden.dtype)
        return jnp.einsum("...d,vd->...v", hidden, emb, precision=L.to_precision(self.cfg.precision))

    def score_tokens(self, hidden_last: jax.Array, token_ids: Any, *, over: str = "vocab") -> jax.Array:
        """Log-probabilities ``[..., K]`` of `token_ids` ``[K]`` as the next token after `hidden_last` ``[..., D]``.

        `over`: "vocab" normalises over the whole vocabulary (LamRA's pointwise P("Yes")); "subset"
        renormalises over the K candidates only (e.g. "Yes" vs "No"). Computed in float32.
        """
        if over not in ("vocab", "subset"):
            raise ValueError(f"over must be 'vocab' or 'subset', got {over!r}")
        logits = self.logits(hidden_last).astype(jnp.float32)
        ids = jnp.asarray(token_ids, jnp.int32)
        if over == "subset":
            return jax.nn.log_softmax(jnp.take(logits, ids, axis=-1), axis=-1)
        return jnp.take(jax.nn.log_softmax(logits, axis=-1), ids, axis=-1)

    def generate_greedy(self, input_ids: jax.Array | None, attention_mask: jax.Array | None, max_new_tokens: int, *,
                        inputs_embeds: jax.Array | None = None, eos_token_id: int | None = None,
                        pad_token_id: int | None = None) -> jax.Array:
        """Greedy decoding: the ``[B, max_new_tokens]`` new token ids (transformers' ``generate(do_sample=False)``
        without the prompt).

        Prompts are given as `input_ids` or `inputs_embeds` (e.g. LLaVA's merged image+text embeddings), left
        padded as for transformers' generate; positions follow ``rotary.positions_from_mask``. After a row emits
        `eos_token_id` it is filled with `pad_token_id` (default: the eos id), as transformers pads finished
        rows. One jitted static-shape loop with a KV cache (:meth:`forward_cached`): a prefill over the prompt,
        then one token per step; no early exit, so finished rows cost the same as running ones.
        """
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        prompt = self.embed(jnp.asarray(input_ids)) if inputs_embeds is None else jnp.asarray(inputs_embeds)
        b, t = prompt.shape[:2]
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        graphdef, state = nnx.split(self)
        # eos / pad are traced (not static): changing them does not recompile.
        eos = jnp.int32(-1 if eos_token_id is None else eos_token_id)
        return greedy_loop(graphdef, state, prompt, mask, int(max_new_tokens), eos, jnp.int32(pad or 0))


class _Embedding(nnx.Module):
    """Token embedding table ``[V, D]`` (param name ``embedding``)."""

    def __init__(self, cfg: DecoderLMConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.embedding = L.make_param(rngs, jax.nn.initializers.normal(cfg.initializer_range),
                                      (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), jnp.dtype(cfg.param_dtype))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], jnp.asarray(input_ids, jnp.int32), axis=0)
        return constrain(x.astype(self.dtype), _ACT)
