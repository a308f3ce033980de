"""Process-level JAX set-up shared by every entry point: one code path for one host and for many."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform

import jax
from absl import logging

from idmr_jax import paths

# The persistent compilation cache's size limit: least recently used programs go first beyond it (local folders).
COMPILATION_CACHE_MAX_BYTES = 4 << 30


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


def host_cache_subdir(cpuinfo: str = "/proc/cpuinfo") -> str:
    """``host-<hash>``: one folder per host CPU model and instruction set. XLA:CPU compiles for the host's own
    instruction set, so a folder shared by several machines (a home directory on NFS) must not hand one CPU's
    programs to another. (Accelerator programs are keyed by their devices already; the host's folder costs them
    nothing, since every host of a slice is the same machine type.)"""
    identity = [platform.machine(), platform.processor()]
    try:
        with open(cpuinfo) as f:
            lines = {line.strip() for line in f if line.startswith(("model name", "flags"))}
        identity += sorted(lines)  # every core repeats them: a set keeps one of each
    except OSError:  # not Linux: the platform strings above are what there is
        pass
    return "host-" + hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]


def compilation_cache_folder(cache_dir: str | None, environ=os.environ) -> str | None:
    """The folder :func:`enable_compilation_cache` uses: ``JAX_COMPILATION_CACHE_DIR`` from `environ` as it is;
    else None (off) for ``cache_dir == ""``; else `cache_dir` (None: ``~/.cache/idmr_jax/xla``, see
    :mod:`idmr_jax.paths`) with :func:`host_cache_subdir` below it."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    if cache_dir == "":
        return None
    return os.path.join(os.path.expanduser(cache_dir) if cache_dir else paths.cache_dir("xla", environ),
                        host_cache_subdir())


def enable_compilation_cache(cache_dir: str | None = None, *,
                             max_bytes: int = COMPILATION_CACHE_MAX_BYTES) -> str | None:
    """Turns on JAX's persistent compilation cache: a later process that compiles the same program (another seed,
    a resumed run, the evaluation of a trained workdir, the README's six demo runs) reads the executable from disk
    instead of compiling it again. Call it before the first compilation (it starts no backend, so it may also
    come before :func:`initialize`); returns the folder in use (:func:`compilation_cache_folder`), or None.

    `cache_dir`: local or ``gs://``; "" turns the cache off; ``JAX_COMPILATION_CACHE_DIR`` in the environment
    wins over it, and JAX reads that variable itself, so nothing is changed then. JAX writes only programs that
    took at least ``jax_persistent_cache_min_compile_time_secs`` (1 s by default) to compile, keys each by the
    program, jaxlib, XLA flags and devices, and in a multi-process run lets process 0 write. A local folder is
    kept under `max_bytes` (least recently used first) unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` is set.
    """
    folder = compilation_cache_folder(cache_dir)
    if folder is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return folder
    jax.config.update("jax_compilation_cache_dir", folder)
    # JAX's size limit takes a file lock on every write, from the filelock package (installed with
    # huggingface-hub); without it the folder grows unbounded rather than failing.
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and importlib.util.find_spec("filelock") is not None:
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))
    logging.info("persistent compilation cache: %s", folder)
    return folder
