"""Greedy decoding for :class:`idmr_jax.models.decoder_lm.DecoderLM`: one jitted, static-shape loop with a KV cache.

The model is passed as ``(graphdef, state)`` and only its ``forward_cached``, ``init_cache``, ``embed`` and
``logits`` methods are used, so this module does not import the model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models.rotary import positions_from_mask


@functools.partial(jax.jit, static_argnums=(0, 4))
def greedy_loop(graphdef, state, prompt, mask, n_new: int, eos: jax.Array, pad: jax.Array) -> jax.Array:
    """The ``[B, n_new]`` greedy tokens after `prompt` ``[B, T, D]`` (embeddings, left padded per `mask` ``[B, T]``)
    for the decoder ``nnx.merge(graphdef, state)`` (see ``DecoderLM.generate_greedy``): a prefill over the prompt
    into a KV cache, then one token per step; rows that emitted `eos` are filled with `pad`."""
    model = nnx.merge(graphdef, state)
    b, t, _ = prompt.shape
    full_mask = jnp.concatenate([mask, jnp.zeros((b, n_new), jnp.int32)], axis=1)
    prompt_pos = positions_from_mask(mask)
    # transformers continues from the last prompt column's position, whatever the padding.
    new_pos = prompt_pos[:, -1:] + 1 + jnp.arange(n_new, dtype=jnp.int32)[None]
    hidden, cache = model.forward_cached(prompt, full_mask, prompt_pos, model.init_cache(b, t + n_new), 0)
    first = jnp.argmax(model.logits(hidden[:, -1]).astype(jnp.float32), axis=-1).astype(jnp.int32)
    done = first == eos
    tokens = jnp.full((b, n_new), pad, jnp.int32).at[:, 0].set(first)

    def step(k, carry):
        # Feeds token k (column t + k) and picks token k + 1.
        tokens, done, full_mask, cache = carry
        # Fresh Variable objects at this trace level (nnx.scan inside the loop refuses outer-level Variables).
        m = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
        full_mask = jax.lax.dynamic_update_slice_in_dim(full_mask, jnp.ones((b, 1), jnp.int32), t + k, axis=1)
        tok = jax.lax.dynamic_slice_in_dim(tokens, k, 1, axis=1)
        pos = jax.lax.dynamic_slice_in_dim(new_pos, k, 1, axis=1)
        hidden, cache = m.forward_cached(m.embed(tok), full_mask, pos, cache, t + k)
        nxt = jnp.argmax(m.logits(hidden[:, 0]).astype(jnp.float32), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad, nxt)
        done = done | (nxt == eos)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], k + 1, axis=1)
        return tokens, done, full_mask, cache

    return jax.lax.fori_loop(0, n_new - 1, step, (tokens, done, full_mask, cache))[0]
