"""AdaFocal's Contextual Reasoning Module (CRM): probe-token features -> modulation strength beta >= 0.

As released: a learnable [CLS] token (init N(0, 1)) is prepended to the probe outputs, a stack of PyTorch-default
``nn.TransformerEncoderLayer`` blocks (post-LayerNorm, ReLU, FFN 2048, dropout 0.1, eps 1e-5) mixes them, and the
[CLS] output goes through Linear -> ReLU -> Linear -> Softplus. The paper's ablations replace the Transformer
by average pooling or an MLP over the concatenated probes. `num_outputs` is 1 for the scalar variant and the
number of query tokens for the vector variant.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.sharding import constrain

_dense_init = nnx.initializers.xavier_uniform()


@dataclasses.dataclass(frozen=True)
class CRMConfig:
    hidden_size: int = 768
    num_probes: int = 8
    aggregator: str = "transformer"  # transformer | mlp | avgpool
    num_layers: int = 2
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    head_hidden: int = 512
    num_outputs: int = 1  # 1: scalar beta; num_query_tokens: vector beta
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"


def _linear(din, dout, axes, cfg: CRMConfig, rngs):
    return nnx.Linear(din, dout, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      kernel_init=nnx.with_partitioning(_dense_init, axes), rngs=rngs)


class EncoderLayer(nnx.Module):
    """Post-LN Transformer encoder layer with PyTorch ``nn.TransformerEncoderLayer`` semantics."""

    def __init__(self, cfg: CRMConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        # Fused q/k/v as PyTorch's `in_proj_weight`, so the weights map one to one.
        self.in_proj = _linear(d, 3 * d, ("embed", "heads"), cfg, rngs)
        self.out_proj = _linear(d, d, ("heads", "embed"), cfg, rngs)
        self.linear1 = _linear(d, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
        self.linear2 = _linear(cfg.ffn_dim, d, ("mlp", "embed"), cfg, rngs)
        # Statistics in float32 (flax reduces in float32), output in the compute dtype (else float32 params promote
        # the residual stream to float32 under bf16).
        norm = functools.partial(nnx.LayerNorm, d, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1, self.norm2 = norm(), norm()
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)  # used after attention, in the FFN and after it

    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.in_proj(x), 3, axis=-1)
        q, k, v = (t.reshape(b, n, h, d // h) for t in (q, k, v))
        # PyTorch's MultiheadAttention applies its own dropout (p=dropout) to the attention weights; that needs
        # the explicit softmax, otherwise jax.nn.dot_product_attention runs (layers.dot_product_attention).
        dropout = None
        if not deterministic and self.dropout.rate > 0:
            dropout = functools.partial(self.dropout, deterministic=False)
        attn = L.dot_product_attention(q, k, v, probs_dropout=dropout).reshape(b, n, d)
        x = self.norm1(x + self.dropout(self.out_proj(attn), deterministic=deterministic))
        ff = self.linear2(self.dropout(jax.nn.relu(self.linear1(x)), deterministic=deterministic))
        return self.norm2(x + self.dropout(ff, deterministic=deterministic))


class ContextualReasoningModule(nnx.Module):
    """Maps probe features [B, K, D] to beta [B, num_outputs] (>= 0, softplus)."""

    def __init__(self, cfg: CRMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        if cfg.aggregator == "transformer":
            self.cls_token = nnx.Param(nnx.with_partitioning(nnx.initializers.normal(1.0), (None, "embed"))(
                rngs.params(), (1, d), cfg.param_dtype))
            self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
            head_in = d
        elif cfg.aggregator == "mlp":
            self.mixer = _linear(cfg.num_probes * d, d, ("mlp", "embed"), cfg, rngs)
            head_in = d
        elif cfg.aggregator == "avgpool":
            head_in = d
        else:
            raise ValueError(f"unknown CRM aggregator {cfg.aggregator!r}; use transformer, mlp or avgpool")
        self.head_hidden = _linear(head_in, cfg.head_hidden, ("embed", "mlp"), cfg, rngs)
        # The last projection runs in float32 whatever the compute dtype: beta scales attention logits, and a
        # bf16 output near 15 moves in steps of 0.06 (under bf16 the learned betas took a handful of values).
        self.head_out = _linear(cfg.head_hidden, cfg.num_outputs, ("mlp", None),
                                dataclasses.replace(cfg, dtype="float32"), rngs)

    def __call__(self, probes: jax.Array, *, deterministic: bool = True) -> jax.Array:
        cfg = self.cfg
        probes = constrain(probes, ("batch", "length", "embed"))
        if cfg.aggregator == "transformer":
            cls = jnp.broadcast_to(self.cls_token[...].astype(probes.dtype)[None],
                                   (probes.shape[0], 1, probes.shape[-1]))
            x = jnp.concatenate([cls, probes], axis=1)
            for layer in self.layers:
                x = layer(x, deterministic=deterministic)
            pooled = x[:, 0]
        elif cfg.aggregator == "mlp":
            pooled = jax.nn.relu(self.mixer(probes.reshape(probes.shape[0], -1)))
        else:
            pooled = probes.mean(axis=1)
        out = self.head_out(jax.nn.relu(self.head_hidden(pooled)).astype(jnp.float32))
        return jax.nn.softplus(out)
