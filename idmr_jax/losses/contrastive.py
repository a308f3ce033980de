"""InfoNCE over the global batch: the dense definition, a gathered shard_map version and a GSPMD baseline.

Definition (AdaFocal / OACIR and the MLLM retrievers, see ``docs`` REFERENCE sections 2 and 4)::

    sim(q_i, t_j) = max_k q_i . t_j[k]   (targets [B, T, E], AdaFocal's 32 Q-Former tokens)
                  = q_i . t_j            (targets [B, E], MLLM last-token embeddings)
    z_ij          = sim(q_i, t_j) / temp
    q2t           = mean_i CE(z_i, label i), the columns being the B targets then all B*Nh hard negatives
    symmetric     = (q2t + mean_j CE(z_:j, label j)) / 2, target -> query over the B x B block only

With label smoothing ``ls`` the target distribution of a row with K columns is ``(1-ls) onehot + ls/K``.
Hard negatives ``[B, Nh, (T,) E]`` are extra columns seen by *every* query (flattened to ``B*Nh`` columns,
row-major), as LamRA / InstructCIR do; they never act as queries.

Three forms compute the same number:

* :func:`infonce_dense`: plain ``jnp`` on full arrays; the definition the others are tested against.
* :func:`global_infonce`: ``jax.shard_map`` over the mesh's batch axes; targets (and hard negatives) are
  all-gathered, each device computes its own rows, the mean is a ``psum``. With ``chunked=True`` it runs the
  ring of :mod:`idmr_jax.losses.ring` instead, whose per-device memory does not grow with the device count.
* :func:`infonce_gspmd`: :func:`infonce_dense` on batch-sharded global arrays; under ``jit`` GSPMD inserts the
  collectives (big_vision style). A baseline, not the path we test in depth.

Precision (``config.precision``, :mod:`idmr_jax.precision`): features are gathered (or passed round the ring) in
the dtype they arrive in, so bfloat16 features move half the bytes, and so does the reduce-scatter of their
gradient; nothing here upcasts them first. The similarity accumulates in float32 and returns float32 logits; the
temperature division, the logsumexp and the loss are float32 whatever the features' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

# BATCH_AXES and similarity are part of this module's public API too (callers import them from here).
from idmr_jax.losses.ring import ring_infonce
from idmr_jax.losses.similarity import BATCH_AXES, check_inputs, similarity


def _smoothed_cross_entropy(logits: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-row cross-entropy against the diagonal label, with a uniformly smoothed target distribution."""
    n, k = logits.shape
    target = (1.0 - label_smoothing) * jax.nn.one_hot(jnp.arange(n), k) + label_smoothing / k
    return -(target * jax.nn.log_softmax(logits, axis=-1)).sum(axis=-1)


def infonce_dense(
    query: jax.Array,
    target: jax.Array,
    temp: jax.Array | float,
    *,
    hard_negatives: jax.Array | None = None,
    direction: str = "q2t",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """The contrastive loss on full (unsharded) arrays: the reference definition.

    Args:
      query: ``[B, E]`` query features.
      target: ``[B, E]`` or ``[B, T, E]`` target features; row i is query i's positive.
      temp: scalar temperature (``logits = sim / temp``); may be a learnable parameter.
      hard_negatives: optional ``[B, Nh, E]`` / ``[B, Nh, T, E]``; all ``B*Nh`` are extra columns of every query.
      direction: ``"q2t"`` (AdaFocal as released) or ``"symmetric"`` (mean of q2t and t2q).
      label_smoothing: uniform smoothing of each row's (and, for t2q, each column's) target distribution.

    Returns:
      The scalar loss, averaged over the batch.
    """
    check_inputs(query, target, hard_negatives, direction, label_smoothing)
    logits = similarity(query, target) / temp
    columns = logits
    if hard_negatives is not None:
        flat = hard_negatives.reshape(-1, *hard_negatives.shape[2:])
        columns = jnp.concatenate([logits, similarity(query, flat) / temp], axis=1)
    q2t = _smoothed_cross_entropy(columns, label_smoothing).mean()
    if direction == "q2t":
        return q2t
    t2q = _smoothed_cross_entropy(logits.T, label_smoothing).mean()
    return 0.5 * (q2t + t2q)


def _gathered_local_loss(q, t, temp, hn, *, axes, symmetric: bool, label_smoothing: float):
    """Per-device body of :func:`global_infonce` (gathered form); returns the global loss on every device."""
    n = jax.lax.axis_size(axes)
    b = q.shape[0]
    global_b = n * b
    # jax.lax.all_gather is differentiable and its transpose is a reduce-scatter (psum_scatter): the gradient that
    # every device sends to a gathered target is summed back onto the device that owns it. So the targets receive
    # the full global-batch gradient, with no "put the local slice back" trick.
    t_all = jax.lax.all_gather(t, axes, tiled=True)
    z = similarity(q, t_all) / temp  # [b, B]: this device's rows against every target of the global batch
    # Row r's positive is global column (device index * b + r): the gather is ordered like the batch sharding.
    pos = jax.lax.axis_index(axes) * b + jnp.arange(b)
    z_pos = jnp.take_along_axis(z, pos[:, None], axis=1)[:, 0]
    cols = z
    if hn is not None:
        hn_all = jax.lax.all_gather(hn, axes, tiled=True)
        cols = jnp.concatenate([z, similarity(q, hn_all.reshape(-1, *hn_all.shape[2:])) / temp], axis=1)
    ls = label_smoothing
    rows = jax.nn.logsumexp(cols, axis=1) - (1.0 - ls) * z_pos - ls * cols.mean(axis=1)
    local = rows.sum()
    if symmetric:
        # Column logsumexp over all global queries from per-device partial stats: B floats cross the wire instead
        # of a second [B, b] block. The shift m is a constant for the logsumexp, hence stop_gradient.
        m = jax.lax.pmax(jax.lax.stop_gradient(z.max(axis=0)), axes)
        col_lse = m + jnp.log(jax.lax.psum(jnp.exp(z - m).sum(axis=0), axes))
        col_mean = jax.lax.psum(z.sum(axis=0), axes) / global_b
        own = jax.lax.axis_index(axes) * b
        own_lse = jax.lax.dynamic_slice_in_dim(col_lse, own, b)
        own_mean = jax.lax.dynamic_slice_in_dim(col_mean, own, b)
        cols_loss = own_lse - (1.0 - ls) * z_pos - ls * own_mean
        local = 0.5 * (local + cols_loss.sum())
    return jax.lax.psum(local, axes) / global_b


def global_infonce(
    query: jax.Array,
    target: jax.Array,
    temp: jax.Array | float,
    *,
    mesh: Mesh,
    hard_negatives: jax.Array | None = None,
    direction: str = "q2t",
    label_smoothing: float = 0.0,
    batch_axes: Sequence[str] = BATCH_AXES,
    chunked: bool = False,
) -> jax.Array:
    """The contrastive loss over the global batch, for inputs sharded on ``batch_axes`` of ``mesh``.

    Every query's negatives are the targets (and hard negatives) of the whole global batch, on all devices.
    Same arguments and result as :func:`infonce_dense` (on the global arrays), plus:

    Args:
      mesh: the device mesh (e.g. from :func:`idmr_jax.sharding.make_mesh`).
      batch_axes: mesh axes the batch dimension is sharded over; the batch must divide by their total size.
      chunked: ``False``: all-gather the targets, per-device memory grows with the device count.
        ``True``: ring of ppermutes with a streaming logsumexp and a custom VJP
        (:func:`idmr_jax.losses.ring.ring_infonce`); per-device memory stays flat.

    Gradients flow to the queries, targets, hard negatives and ``temp``. Call under ``jax.jit``.
    """
    axes = tuple(batch_axes)
    check_inputs(query, target, hard_negatives, direction, label_smoothing)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if query.shape[0] % n:
        raise ValueError(f"batch {query.shape[0]} does not divide over batch axes {axes} of size {n}")
    temp = jnp.asarray(temp, jnp.float32)
    if chunked:
        return ring_infonce(
            query,
            target,
            temp,
            mesh=mesh,
            hard_negatives=hard_negatives,
            direction=direction,
            label_smoothing=label_smoothing,
            batch_axes=axes,
        )

    def body(q, t, tmp, *maybe_hn):
        hn = maybe_hn[0] if maybe_hn else None
        return _gathered_local_loss(
            q, t, tmp, hn, axes=axes, symmetric=direction == "symmetric", label_smoothing=float(label_smoothing)
        )

    args = (query, target, temp) + ((hard_negatives,) if hard_negatives is not None else ())
    specs = (P(axes), P(axes), P()) + ((P(axes),) if hard_negatives is not None else ())
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P())(*args)


def infonce_gspmd(
    query: jax.Array,
    target: jax.Array,
    temp: jax.Array | float,
    *,
    mesh: Mesh,
    hard_negatives: jax.Array | None = None,
    direction: str = "q2t",
    label_smoothing: float = 0.0,
    batch_axes: Sequence[str] = BATCH_AXES,
) -> jax.Array:
    """Baseline: :func:`infonce_dense` with the inputs constrained to batch sharding; GSPMD adds the gathers.

    Meant to be called under ``jax.jit`` with an Auto-axis mesh; XLA decides the communication.
    """
    sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    query, target = (jax.lax.with_sharding_constraint(x, sharding) for x in (query, target))
    if hard_negatives is not None:
        hard_negatives = jax.lax.with_sharding_constraint(hard_negatives, sharding)
    return infonce_dense(
        query, target, temp, hard_negatives=hard_negatives, direction=direction, label_smoothing=label_smoothing
    )
