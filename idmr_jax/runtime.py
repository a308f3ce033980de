"""Process-level JAX set-up shared by every entry point."""

from __future__ import annotations

import os

import jax
from absl import logging


def initialize(config=None) -> None:
    """Initialises multi-process JAX when the environment asks for it; a no-op on a single host.

    On TPU VMs ``jax.distributed.initialize()`` discovers the slice by itself; on GPU clusters it reads
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or Slurm's variables).
    ``IDMR_DISTRIBUTED=1`` asks for it explicitly (``launch/tpu_vm.sh run`` sets it): a plain TPU VM's
    environment does not show that it belongs to a multi-host slice, only its metadata server does.
    """
    if jax.distributed.is_initialized():
        return
    wants = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1" \
        or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get("IDMR_DISTRIBUTED") == "1"
    if wants:
        kwargs = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                          process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kwargs)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend())
