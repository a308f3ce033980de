"""Rotary position embeddings (RoPE) as transformers computes them: the default rope, rotate-half layout.

Shared by the decoder LMs (:mod:`idmr_jax.models.decoder_lm`); multimodal variants (M-RoPE) build on the same
cos/sin tables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """transformers' generation positions: ``cumsum(mask) - 1`` per row, 0 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[B, T, head_dim]`` of the default rotary embedding (computed in float32, then cast)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``[B, T, heads, head_dim]`` with cos/sin ``[B, T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
