"""CLIP text tower (transformers ``CLIPTextModel``) in Flax NNX.

token + learned position embeddings -> pre-LN transformer blocks with a causal (and padding) attention mask ->
``final_layer_norm``. ``tokens`` equals ``last_hidden_state``; ``pooled`` equals ``pooler_output``: the hidden
state at the end-of-text token, found as transformers 5 does:

* ``eos_token_id == 2`` (configs written before transformers PR #24773, e.g. the original OpenAI checkpoints):
  the position of the largest token id in the row (CLIP's EOT, 49407, is the largest id of its vocabulary);
* otherwise the *first* position holding ``eos_token_id`` (the pad id may equal it).

The blocks are :class:`idmr_jax.models.vit.Block` (CLIP's text and vision towers share ``CLIPEncoderLayer``), so
scan / remat / dtype options and the per-layer weight names are the ViT's. Flax param paths::

    token_embed              [V, D]   (vocab, embed)
    pos_embed                [P, D]   (None, embed)
    encoder/layers/{i}/...            as in idmr_jax.models.vit (CLIP style)
    final_norm/{scale,bias}  [D]
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models import vit
from idmr_jax.sharding import constrain

LEGACY_EOS_ID = 2  # transformers: "eos_token_id == 2" selects the argmax-of-ids rule


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP text transformer. ``eos_token_id`` decides the pooling rule (see the module docstring)."""

    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    max_positions: int = 77
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 1
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    precision: str | None = None

    def __post_init__(self):
        self.block_config()  # validates widths / heads / activation / remat

    def block_config(self) -> vit.ViTConfig:
        """The CLIP-style :class:`ViTConfig` the shared blocks are built from (patch/image fields are unused)."""
        return vit.ViTConfig(width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                             patch_size=1, image_size=1, style="clip", layer_norm_eps=self.layer_norm_eps,
                             act=self.act, dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat,
                             scan=self.scan, precision=self.precision)


@flax.struct.dataclass
class TextOutput:
    """`tokens`: [B, T, D] after ``final_layer_norm``; `pooled`: [B, D] at the end-of-text token."""

    tokens: jax.Array
    pooled: jax.Array


def causal_padding_bias(attention_mask: jax.Array | None, length: int, batch: int) -> jax.Array:
    """Additive bias [B, 1, T, T]: 0 where query i may see key j (j <= i and key j not padding), else float32 min
    (the value transformers' eager masks use; a fully masked row then softmaxes to uniform, as there)."""
    allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    allowed = jnp.broadcast_to(allowed, (batch, 1, length, length))
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the pooled (end-of-text) token per row, with transformers 5's rule (see the module docstring)."""
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    if eos_token_id == LEGACY_EOS_ID:
        return jnp.argmax(ids, axis=-1)  # first maximum, as torch.argmax
    return jnp.argmax(ids == eos_token_id, axis=-1)  # first occurrence (0 when absent, as in transformers)


class CLIPTextTransformer(nnx.Module):
    """The CLIP text tower; ``__call__(input_ids, attention_mask=None, position_ids=None) -> TextOutput``."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.token_embed = L.make_param(rngs, L.trunc_normal(0.02), (cfg.vocab_size, cfg.width), ("vocab", "embed"),
                                        pdt)
        self.pos_embed = L.make_param(rngs, L.trunc_normal(0.01), (cfg.max_positions, cfg.width), (None, "embed"),
                                      pdt)
        block_cfg = cfg.block_config()
        self.encoder = vit.Encoder(block_cfg, rngs=rngs)
        self.final_norm = L.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                                      param_dtype=pdt, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, *, deterministic: bool = True) -> TextOutput:
        """Encodes token ids [B, T] (T <= max_positions). `attention_mask` [B, T] masks padded keys (CLIP's
        tokenizer pads on the right); `deterministic` is accepted for API uniformity (no dropout)."""
        del deterministic
        cfg = self.cfg
        b, t = input_ids.shape
        if t > cfg.max_positions:
            raise ValueError(f"text of {t} tokens is longer than max_positions={cfg.max_positions}")
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.token_embed[...], input_ids, axis=0).astype(dtype)
        pos = jnp.arange(t)[None] if position_ids is None else position_ids
        x = x + jnp.take(self.pos_embed[...], pos, axis=0).astype(dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = self.encoder(x, bias=causal_padding_bias(attention_mask, t, b))
        x = self.final_norm(x)
        pooled = jnp.take_along_axis(x, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        return TextOutput(tokens=x, pooled=pooled)
