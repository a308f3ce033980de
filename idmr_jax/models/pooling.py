"""Sequence pooling for MLLM embedders: one vector per sequence out of the LM's last hidden states.

Methods (``pool(..., method=...)``):

* ``"last"``: the last position whose attention mask is 1 (IDMR / VLM2Vec ``last``). Works for left padding
  (the last column), right padding (``sum(mask) - 1``) and anything in between, row by row.
* ``"eos"``: the *last* attended occurrence of the EOS id `token_id`. VLM2Vec's ``eos`` is the same gather as its
  ``last`` (its processors end every input with the EOS token, so the last real token is the EOS); searching the
  last occurrence among attended positions gives that same position for such inputs, and stays right when the
  pad id equals the EOS id (padding is not attended) or a prompt holds an earlier EOS.
* ``"before_token"``: LamRA: the hidden state just before the first attended occurrence of an added special
  token (`token_id`, LamRA's ``<emb>``), i.e. the state that *predicts* ``<emb>``.
* ``"mean"``: the mean over attended positions (VLM2Vec's ``avg``).

All gathers are ``take_along_axis`` on traced indices, so they jit and shard. A row with nothing to pool (an
all-zero mask, or no occurrence of `token_id`, or `token_id` at position 0 for ``before_token``) cannot raise
under jit: it becomes NaN, so a loss on it is NaN and the trainer's NaN check stops the run instead of training
on a made-up vector. :func:`check_poolable` raises on such rows eagerly (data pipelines, tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("last", "eos", "before_token", "mean")
_NEEDS_TOKEN = ("eos", "before_token")


def validate_pooling(method: str, token_id: int | None) -> None:
    """Raises ValueError for an unknown pooling method, or one that needs a token id without one."""
    if method not in METHODS:
        raise ValueError(f"unknown pooling method {method!r}; known: {METHODS}")
    if method in _NEEDS_TOKEN and token_id is None:
        raise ValueError(f"pooling method {method!r} needs token_id (the EOS / <emb> id)")


def pool_positions(attention_mask: jax.Array, input_ids: jax.Array | None, *, method: str,
                   token_id: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(positions [B] int32, valid [B] bool): the index each row pools at (methods other than "mean")."""
    validate_pooling(method, token_id)
    if method == "mean":
        raise ValueError("'mean' pools over all attended positions, not at one position")
    mask = jnp.asarray(attention_mask).astype(bool)
    t = mask.shape[-1]
    if method == "last":
        hits = mask
    else:
        if input_ids is None:
            raise ValueError(f"pooling method {method!r} needs input_ids")
        hits = mask & (jnp.asarray(input_ids) == token_id)
    valid = jnp.any(hits, axis=-1)
    if method == "before_token":
        first = jnp.argmax(hits, axis=-1).astype(jnp.int32)  # argmax returns the first True
        return jnp.maximum(first - 1, 0), valid & (first > 0)
    last = (t - 1 - jnp.argmax(hits[:, ::-1], axis=-1)).astype(jnp.int32)
    return last, valid


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) over the last axis, computed in float32 (torch ``F.normalize`` semantics)."""
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    return (x32 / jnp.maximum(norm, eps)).astype(x.dtype)


def pool(hidden: jax.Array, attention_mask: jax.Array, input_ids: jax.Array | None = None, *, method: str = "last",
         token_id: int | None = None, normalize: bool = True) -> jax.Array:
    """Pools ``hidden [B, T, D]`` to ``[B, D]`` with `method` (see the module docstring), then L2-normalises.

    Rows with nothing to pool come out as NaN (see the module docstring).
    """
    validate_pooling(method, token_id)
    mask = jnp.asarray(attention_mask)
    if method == "mean":
        w = mask.astype(jnp.float32)[..., None]
        count = jnp.sum(w, axis=1)
        out = (jnp.sum(hidden.astype(jnp.float32) * w, axis=1) / jnp.maximum(count, 1.0)).astype(hidden.dtype)
        valid = count[:, 0] > 0
    else:
        pos, valid = pool_positions(mask, input_ids, method=method, token_id=token_id)
        out = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]
    if normalize:
        out = l2_normalize(out)
    return jnp.where(valid[:, None], out, jnp.asarray(jnp.nan, out.dtype))


def check_poolable(attention_mask, input_ids=None, *, method: str, token_id: int | None = None,
                   what: str = "batch") -> None:
    """Eagerly raises ``ValueError`` naming the rows of `what` that `method` cannot pool (numpy inputs)."""
    validate_pooling(method, token_id)
    mask = np.asarray(attention_mask).astype(bool)
    if method in ("last", "mean"):
        bad = ~mask.any(axis=-1)
        reason = "an all-zero attention mask"
    else:
        hits = mask & (np.asarray(input_ids) == token_id)
        bad = ~hits.any(axis=-1)
        if method == "before_token":
            bad |= hits.any(axis=-1) & (hits.argmax(axis=-1) == 0)
        reason = f"no attended token {token_id} ({method})" + (" or it is at position 0" if method == "before_token" else "")
    rows = np.flatnonzero(bad)
    if rows.size:
        raise ValueError(f"{what}: rows {rows[:8].tolist()} cannot be pooled: {reason}")
