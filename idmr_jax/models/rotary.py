"""Rotary position embeddings (RoPE) as transformers computes them: the default rope, rotate-half layout.

Shared by the decoder LMs (:mod:`idmr_jax.models.decoder_lm`) and the Qwen2-VL vision tower
(:mod:`idmr_jax.models.qwen2vl_vision`). Three tables, all computed in float32 and then cast:

* :func:`rope_cos_sin`: 1D positions ``[B, T]`` (Qwen2 / Llama).
* :func:`mrope_cos_sin`: Qwen2-VL's multimodal RoPE: positions ``[3, B, T]`` (temporal, height, width); the
  ``head_dim / 2`` frequencies are cut into ``mrope_section`` consecutive chunks, chunk ``i`` rotating by the
  position of axis ``i % 3``. With three equal position rows it equals :func:`rope_cos_sin`.
* :func:`axial_cos_sin`: the Qwen2-VL ViT's 2D RoPE: positions ``[..., 2]`` (row, column); the first half of the
  frequencies (built over ``head_dim / 2``) rotates by the row, the second half by the column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """transformers' generation positions: ``cumsum(mask) - 1`` per row, 0 on padding."""
    m = attention_mask.astype(jnp.int32)
    return jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
    """``theta ** -(2i / dim)`` for ``i < dim / 2`` (float32), transformers' default rope frequencies."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _cos_sin(freqs: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[B, T, head_dim]`` of the default rotary embedding (computed in float32, then cast)."""
    freqs = position_ids.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)
    return _cos_sin(freqs, dtype)


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, section, dtype
                  ) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[B, T, head_dim]`` of M-RoPE for ``position_ids [3, B, T]`` (see the module docstring);
    ``sum(section) == head_dim / 2``."""
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"M-RoPE position_ids must be [3, B, T], got {position_ids.shape}")
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(section)} must sum to head_dim / 2 = {head_dim // 2}")
    freqs = position_ids.astype(jnp.float32)[..., None] * inverse_frequencies(head_dim, theta)  # [3, B, T, hd/2]
    chunks, start = [], 0
    for i, width in enumerate(section):
        chunks.append(freqs[i % 3, ..., start:start + width])
        start += width
    return _cos_sin(jnp.concatenate(chunks, axis=-1), dtype)


def axial_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos / sin ``[..., head_dim]`` of the 2D (axial) RoPE for ``positions [..., 2]`` (row, column): the
    ``head_dim / 4`` frequencies are built over ``head_dim / 2``; the row positions drive the first
    ``head_dim / 4`` angles, the column positions the next ``head_dim / 4`` (then repeated, rotate-half layout)."""
    inv_freq = inverse_frequencies(head_dim // 2, theta)
    pos = positions.astype(jnp.float32)
    freqs = jnp.concatenate([pos[..., 0:1] * inv_freq, pos[..., 1:2] * inv_freq], axis=-1)
    return _cos_sin(freqs, dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``[B, T, heads, head_dim]`` with cos/sin ``[B, T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
