"""Process-level JAX set-up shared by every entry point: one code path for one host and for many."""

from __future__ import annotations

import os

import jax
from absl import logging


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(config=None, *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Initialises multi-process JAX when the flags or the environment ask for it; a no-op on a single host.

    Must run before anything touches a JAX backend. Sources, the first that is set wins:

    * the arguments (``--coordinator_address``, ``--num_processes``, ``--process_id`` of ``idmr_jax.main``);
    * ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (``launch/gpu_slurm.sh`` sets them);
    * JAX's own cluster detection (Slurm, Open MPI, Cloud TPU metadata) for whatever is still unset.

    ``IDMR_DISTRIBUTED=1`` asks for it explicitly (``launch/tpu_vm.sh run`` sets it): a plain TPU VM's
    environment does not show that it belongs to a multi-host slice, only its metadata server does.
    Multi-process CPU runs need no extra setting: jax 0.10.2 uses gloo collectives on CPU by default
    (``jax_cpu_collectives_implementation``), wired to the coordinator's key-value store.
    """
    del config  # the signature takes the config so that a future setting can come from it
    if jax.distributed.is_initialized():
        return
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    wants = (address is not None or count is not None or index is not None
             or os.environ.get("SLURM_NTASKS", "1") != "1"
             or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
             or os.environ.get("IDMR_DISTRIBUTED") == "1")
    if wants:
        kwargs = {k: v for k, v in dict(coordinator_address=address, num_processes=count, process_id=index).items()
                  if v is not None}
        jax.distributed.initialize(**kwargs)
    logging.info("JAX process %d/%d, %d local / %d global devices (%s)", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.default_backend())


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Blocks until every process reaches the barrier `name`; a no-op with one process.

    It waits through the coordination service, with its own long timeout, not through collectives. That matters
    before a device group's first collective on CPU: gloo gives the peers only 30 s to show up, so processes whose
    compile times differ (a program read from the persistent cache on one host only, a busy machine) must be
    lined up first.
    """
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp

        ocp.multihost.get_barrier_sync_fn()(key=f"idmr_{name}", timeout_ms=timeout_s * 1000)
