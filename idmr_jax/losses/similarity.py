"""The pieces every form of the contrastive loss shares: the batch mesh axes, the query-target similarity and
the input checks. Both :mod:`idmr_jax.losses.contrastive` (dense and gathered forms, and the dispatcher) and
:mod:`idmr_jax.losses.ring` (the chunked form) import them from here, so neither imports the other back."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
DIRECTIONS = ("q2t", "symmetric")


def similarity(query: jax.Array, target: jax.Array) -> jax.Array:
    """Query-target similarity ``[N, M]`` in float32.

    ``target`` is ``[M, E]`` (dot product) or ``[M, T, E]`` (max over the T target tokens of the dot product,
    AdaFocal's late interaction). The max's gradient goes to the arg-max token (split evenly on exact ties).
    """
    if target.ndim == 2:
        return jnp.einsum("ne,me->nm", query, target, preferred_element_type=jnp.float32)
    if target.ndim == 3:
        return jnp.einsum("ne,mte->nmt", query, target, preferred_element_type=jnp.float32).max(axis=-1)
    raise ValueError(f"target must be [M, E] or [M, T, E], got shape {target.shape}")


def check_inputs(query, target, hard_negatives, direction: str, label_smoothing: float) -> None:
    """Validates shapes and options shared by every form of the loss; raises ValueError naming the problem."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if query.ndim != 2:
        raise ValueError(f"query must be [B, E], got shape {query.shape}")
    if target.ndim not in (2, 3) or target.shape[0] != query.shape[0] or target.shape[-1] != query.shape[-1]:
        raise ValueError(f"target must be [B, E] or [B, T, E] matching query {query.shape}, got {target.shape}")
    if hard_negatives is not None:
        hn = hard_negatives
        if hn.ndim != target.ndim + 1 or hn.shape[0] != target.shape[0] or hn.shape[2:] != target.shape[1:]:
            raise ValueError(
                f"hard_negatives must be [B, Nh, *target.shape[1:]] = [{target.shape[0]}, Nh, "
                f"{', '.join(map(str, target.shape[1:]))}], got {hn.shape}"
            )
