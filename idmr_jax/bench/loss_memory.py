"""``loss_memory``: per-device memory of the dense (gathered) and the chunked (ring) global InfoNCE.

    python -m idmr_jax.bench loss_memory [--devices=1,2,4,8] [--per-device-batch=32] [--tokens=32] [--dim=256]
        [--direction=q2t] [--out=F.json]

For each device count n, loss + gradients are compiled on an n-device sub-mesh at a fixed per-device batch
(`idmr_jax.losses.memory.loss_memory_profile`) and XLA's memory analysis gives the per-device temporary bytes.
The gathered loss holds the global batch's targets and a ``[b, n*b, T]`` logits block, so it grows linearly in n;
the ring stays flat. Nothing runs, so this is exact and fast. On CPU the devices are fake
(``--xla_force_host_platform_device_count``, set by ``python -m idmr_jax.bench`` before JAX starts).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from idmr_jax.bench import common


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="1,2,4,8", help="device counts")
    p.add_argument("--per-device-batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="target tokens (0: single-vector targets)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--direction", choices=["q2t", "symmetric"], default="q2t")


def before_jax(argv: Sequence[str]) -> None:
    """Asks for enough fake CPU devices for ``--devices`` (before JAX initialises; TPU/GPU ignore it)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--devices", default="1,2,4,8")
    known, _ = parser.parse_known_args(list(argv))
    need = max(common.parse_ints(known.devices) or [1])
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()


def run(args: argparse.Namespace) -> dict:
    from idmr_jax.losses.memory import loss_memory_profile

    counts = common.parse_ints(args.devices)
    rows = loss_memory_profile(counts, per_device_batch=args.per_device_batch, tokens=args.tokens or None,
                               dim=args.dim, direction=args.direction)
    table = {}
    for r in rows:
        table.setdefault(r["method"], {})[str(r["devices"])] = r["temp_bytes"]
    # n = 1 runs no ring and n = 2 a one-step one (XLA unrolls it); from n >= 3 the ring is a loop of constant size,
    # so flatness is judged from the smallest count >= 2 on.
    base = min((c for c in counts if c >= 2), default=min(counts))
    growth = {m: v[str(max(counts))] / max(v[str(base)], 1) for m, v in table.items()}
    chunk = args.per_device_batch * max(args.tokens, 1) * args.dim * 4
    return {"suite": "loss_memory", "machine": common.machine_info(),
            "setup": {"per_device_batch": args.per_device_batch, "tokens": args.tokens, "dim": args.dim,
                      "direction": args.direction, "dtype": "float32"},
            "rows": rows, "temp_bytes": table, "target_chunk_bytes": chunk,
            "growth": {"from_devices": base, "to_devices": max(counts), "factor": growth}}
