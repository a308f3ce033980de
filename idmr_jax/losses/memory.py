"""Per-device memory of the global-batch losses as the device count grows (compiled, nothing is run).

Used by the tests and by the ``loss_memory`` benchmark: at a fixed per-device batch, the gathered loss holds the
whole global batch of targets and a ``[b, B(, T)]`` logits block, so its temporary memory grows linearly with the
device count; the ring holds a few ``[b, ...]`` chunks and stays flat.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idmr_jax.losses.contrastive import global_infonce
from idmr_jax.sharding import make_mesh

METHODS = ("gathered", "chunked")


def loss_memory_profile(
    device_counts: Sequence[int] = (1, 2, 4, 8),
    per_device_batch: int = 8,
    tokens: int | None = 32,
    dim: int = 64,
    *,
    methods: Sequence[str] = METHODS,
    direction: str = "q2t",
    num_hard_negatives: int = 0,
    dtype=jnp.float32,
) -> list[dict]:
    """Compiles loss + gradients for each device count and method and reports per-device memory.

    Each count ``n`` runs in this process on a ``(data=n, fsdp=1, model=1)`` sub-mesh of the first ``n`` devices
    (on CPU set ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before importing jax).

    Args:
      device_counts: numbers of devices to compile for.
      per_device_batch: queries (and targets) per device; the global batch is ``n * per_device_batch``.
      tokens: target tokens T (targets ``[B, T, dim]``), or ``None`` for single-vector targets ``[B, dim]``.
      dim: feature size E.
      methods: any of ``"gathered"`` (``global_infonce``) and ``"chunked"`` (``global_infonce(chunked=True)``).
      direction: ``"q2t"`` or ``"symmetric"``.
      num_hard_negatives: hard negatives per query (0: none).
      dtype: feature dtype.

    Returns:
      One dict per (method, device count): ``method, devices, per_device_batch, global_batch, tokens, dim,
      temp_bytes, argument_bytes, output_bytes`` (bytes per device, from ``Compiled.memory_analysis()``).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    rows = []
    for n in device_counts:
        if n > jax.device_count():
            raise ValueError(f"{n} devices requested, {jax.device_count()} available")
        mesh = make_mesh({"data": n, "fsdp": 1, "model": 1}, devices=jax.devices()[:n])
        sharded = NamedSharding(mesh, P(("data", "fsdp")))
        b = n * per_device_batch
        item = (dim,) if tokens is None else (tokens, dim)
        q = jax.ShapeDtypeStruct((b, dim), dtype, sharding=sharded)
        t = jax.ShapeDtypeStruct((b, *item), dtype, sharding=sharded)
        hn = jax.ShapeDtypeStruct((b, num_hard_negatives, *item), dtype, sharding=sharded)
        temp = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
        for method in methods:

            def loss(q, t, hn, temp, chunked=method == "chunked"):
                return global_infonce(
                    q,
                    t,
                    temp,
                    mesh=mesh,
                    hard_negatives=hn if num_hard_negatives else None,
                    direction=direction,
                    chunked=chunked,
                )

            grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3) if num_hard_negatives else (0, 1, 3))
            stats = jax.jit(grad_fn).lower(q, t, hn, temp).compile().memory_analysis()
            rows.append(
                dict(
                    method=method,
                    devices=n,
                    per_device_batch=per_device_batch,
                    global_batch=b,
                    tokens=tokens,
                    dim=dim,
                    temp_bytes=int(stats.temp_size_in_bytes),
                    argument_bytes=int(stats.argument_size_in_bytes),
                    output_bytes=int(stats.output_size_in_bytes),
                )
            )
    return rows
