"""Chunked global-batch InfoNCE: a ring over the batch axes, flat per-device memory.

Every device keeps its own queries and passes its chunk of targets (with its hard negatives) around the ring of
batch devices with ``ppermute``: after ``n`` steps every query has met every target, one ``[b, b(, T)]`` block
at a time. Row statistics (running max, sum of exponentials, sum of logits for label smoothing) stay with the
queries; column statistics for the symmetric loss travel *with* the chunk and take one more hop to get home.

Autodiff through that loop would keep one block of residuals per step, so memory would grow with the device
count again. Instead a ``custom_vjp`` saves only the inputs and the per-row / per-column logsumexps, and the
backward pass re-runs the ring: each block's logits are recomputed, turned into ``dL/dlogits`` from the saved
logsumexps, and pulled back through the block's similarity with ``jax.vjp``. The gradient accumulator of a target
chunk travels with the chunk and, after a full rotation, lands on the device that owns it.

Per-device memory: a few target chunks (the one in use, the one arriving), one logits block and its
similarity residuals, all independent of the number of devices. Communication per pass: ``n - 1`` chunk hops.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from idmr_jax.losses.similarity import BATCH_AXES, check_inputs, similarity


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    mesh: Mesh
    axes: tuple[str, ...]
    symmetric: bool
    label_smoothing: float

    @property
    def weights(self) -> tuple[float, float]:
        """Weights of the query->target rows and target->query columns in the loss."""
        return (0.5, 0.5) if self.symmetric else (1.0, 0.0)


def _shift(tree, axes):
    """Sends every array of `tree` one step along the ring (device i -> i + 1) of the batch axes."""
    n = jax.lax.axis_size(axes)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)


def _block(q, t, hn, temp):
    """Logits of the local queries against one chunk: targets ``[b, b]`` and hard negatives ``[b, b*Nh]``."""
    z = similarity(q, t) / temp
    zh = None if hn is None else similarity(q, hn.reshape(-1, *hn.shape[2:])) / temp
    return z, zh


def _merge(stats, x, axis):
    """Folds block `x` into streaming (max, sum of exp, sum) statistics along `axis`."""
    m, s, total = stats
    m_new = jnp.maximum(m, x.max(axis=axis))
    s = s * jnp.exp(m - m_new) + jnp.exp(x - jnp.expand_dims(m_new, axis)).sum(axis=axis)
    return m_new, s, total + x.sum(axis=axis)


def _first(x, axis):
    m = x.max(axis=axis)
    return m, jnp.exp(x - jnp.expand_dims(m, axis)).sum(axis=axis), x.sum(axis=axis)


def _row_block(z, zh):
    return z if zh is None else jnp.concatenate([z, zh], axis=1)


def _fwd_local(cfg: _RingConfig, q, t, temp, *maybe_hn):
    """Per-device forward ring: returns (global loss, row logsumexp [b], column logsumexp [b] or nothing)."""
    hn = maybe_hn[0] if maybe_hn else None
    axes, ls = cfg.axes, cfg.label_smoothing
    n, b = jax.lax.axis_size(axes), q.shape[0]
    global_b = n * b
    num_cols = global_b * (1 + (hn.shape[1] if hn is not None else 0))

    z, zh = _block(q, t, hn, temp)  # step 0: the device's own chunk holds the positives, on the diagonal
    z_pos = jnp.diagonal(z)
    rows = _first(_row_block(z, zh), 1)
    cols = _first(z, 0) if cfg.symmetric else None

    def step(carry, _):
        t_c, hn_c, cols, rows = carry
        t_c, hn_c, cols = _shift((t_c, hn_c, cols), axes)
        z, zh = _block(q, t_c, hn_c, temp)
        rows = _merge(rows, _row_block(z, zh), 1)
        cols = _merge(cols, z, 0) if cfg.symmetric else None
        return (t_c, hn_c, cols, rows), None

    (_, _, cols, rows), _ = jax.lax.scan(step, (t, hn, cols, rows), length=n - 1)
    w_q, w_t = cfg.weights
    row_lse = rows[0] + jnp.log(rows[1])
    local = w_q * (row_lse - (1.0 - ls) * z_pos - ls * rows[2] / num_cols).sum()
    if not cfg.symmetric:
        return jax.lax.psum(local, axes) / global_b, row_lse
    if n > 1:  # the column stats sit one hop before their owner after n - 1 shifts
        cols = _shift(cols, axes)
    col_lse = cols[0] + jnp.log(cols[1])
    local = local + w_t * (col_lse - (1.0 - ls) * z_pos - ls * cols[2] / global_b).sum()
    return jax.lax.psum(local, axes) / global_b, row_lse, col_lse


def _bwd_local(cfg: _RingConfig, g, q, t, temp, row_lse, *rest):
    """Per-device backward ring: returns (dq, dt, dtemp[, dhn]); dt / dhn arrive home after a full rotation."""
    col_lse = rest[0] if cfg.symmetric else None
    hn = rest[-1] if len(rest) > int(cfg.symmetric) else None
    axes, ls = cfg.axes, cfg.label_smoothing
    n, b = jax.lax.axis_size(axes), q.shape[0]
    global_b = n * b
    num_cols = global_b * (1 + (hn.shape[1] if hn is not None else 0))
    w_q, w_t = cfg.weights
    scale = g / global_b
    # temp is replicated; make it device-varying so each block's vjp gives a local dtemp (pulling back through the
    # implicit broadcast would psum it on every step); the one psum happens at the end.
    temp_v = jax.lax.pcast(temp, axes, to="varying")

    def grads(t_c, hn_c, col_lse_c, own: bool):
        (z, zh), pull = jax.vjp(_block, q, t_c, hn_c, temp_v)
        # d(row loss)/dz = softmax_row - ls/K - (1-ls)*onehot, from the saved row logsumexp (likewise columns).
        dz = w_q * (jnp.exp(z - row_lse[:, None]) - ls / num_cols)
        if cfg.symmetric:
            dz = dz + w_t * (jnp.exp(z - col_lse_c[None, :]) - ls / global_b)
        if own:
            dz = dz - (w_q + w_t) * (1.0 - ls) * jnp.eye(b, dtype=dz.dtype)
        dzh = None if zh is None else w_q * (jnp.exp(zh - row_lse[:, None]) - ls / num_cols) * scale
        # Accumulate in float32 across the ring steps even for bf16 features; cast once at the end.
        return jax.tree.map(lambda x: x.astype(jnp.float32), pull((dz * scale, dzh)))

    dq, dt, dhn, dtemp = grads(t, hn, col_lse, True)

    def step(carry, _):
        t_c, hn_c, cl_c, dt_c, dhn_c, dq, dtemp = carry
        # The chunk's gradient accumulator rides along with the chunk.
        t_c, hn_c, cl_c, dt_c, dhn_c = _shift((t_c, hn_c, cl_c, dt_c, dhn_c), axes)
        a, bt, c, d = grads(t_c, hn_c, cl_c, False)
        dhn_c = None if hn_c is None else dhn_c + c
        return (t_c, hn_c, cl_c, dt_c + bt, dhn_c, dq + a, dtemp + d), None

    carry = (t, hn, col_lse, dt, dhn, dq, dtemp)
    (_, _, _, dt, dhn, dq, dtemp), _ = jax.lax.scan(step, carry, length=n - 1)
    if n > 1:  # one more hop brings each accumulator back to the owner of its chunk
        dt, dhn = _shift((dt, dhn), axes)
    out = (dq.astype(q.dtype), dt.astype(t.dtype), jax.lax.psum(dtemp, axes).astype(temp.dtype))
    return out if hn is None else out + (dhn.astype(hn.dtype),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _RingConfig, q, t, hn, temp):
    return _ring_fwd(cfg, q, t, hn, temp)[0]


def _ring_fwd(cfg: _RingConfig, q, t, hn, temp):
    spec = P(cfg.axes)
    args = (q, t, temp) + (() if hn is None else (hn,))
    in_specs = (spec, spec, P()) + (() if hn is None else (spec,))
    out_specs = (P(), spec, spec) if cfg.symmetric else (P(), spec)
    loss, *lse = jax.shard_map(
        functools.partial(_fwd_local, cfg), mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs
    )(*args)
    return loss, (q, t, hn, temp, tuple(lse))


def _ring_bwd(cfg: _RingConfig, res, g):
    q, t, hn, temp, lse = res
    spec = P(cfg.axes)
    args = (g, q, t, temp) + lse + (() if hn is None else (hn,))
    in_specs = (P(), spec, spec, P()) + (spec,) * len(lse) + (() if hn is None else (spec,))
    out_specs = (spec, spec, P()) + (() if hn is None else (spec,))
    dq, dt, dtemp, *dhn = jax.shard_map(
        functools.partial(_bwd_local, cfg), mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs
    )(*args)
    return dq, dt, (dhn[0] if dhn else None), dtemp


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_infonce(
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
    """Chunked global-batch InfoNCE; same arguments and value as ``global_infonce(..., chunked=True)``.

    Supports both directions, label smoothing, hard negatives and token / single-vector targets. Per-device memory
    does not depend on the number of devices on ``batch_axes``. Call under ``jax.jit``.
    """
    check_inputs(query, target, hard_negatives, direction, label_smoothing)
    cfg = _RingConfig(mesh, tuple(batch_axes), direction == "symmetric", float(label_smoothing))
    return _ring(cfg, query, target, hard_negatives, jnp.asarray(temp, jnp.float32))
