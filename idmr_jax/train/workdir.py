"""The layout of a training workdir, in one place: what ``python -m idmr_jax.main --workdir=W`` writes.

    W/checkpoints/<step>/state/    the TrainState (Orbax; step, params, frozen, opt_state, rng)
    W/checkpoints/<step>/config/   the resolved ml_collections config as JSON
    W/checkpoints/<step>/data/     each process's data-iterator state (``process_<i>-of-<n>.json``)
    W/checkpoints/<step>/checksums.json   sha256 of every file of the step, written once the save is final
    W/checkpoints/corrupt/<step>-<reason>/  checkpoints found unreadable, moved aside (never deleted)
    W/.lock                        JSON {host, pid, start_time} of the run that holds the workdir
    W/eval/                        evaluation outputs (metrics.json, rankings.jsonl)

Orbax writes a step under a temporary name and renames it when the save is complete, so only all-digit folders
holding a ``state`` item are finished checkpoints (``corrupt/`` is not one). Paths may be local or ``gs://``
(etils.epath).
"""

from __future__ import annotations

import os

import ml_collections
from etils import epath

from idmr_jax import paths, precision

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
CONFIG_ITEM = "config"
DATA_ITEM = "data"
CHECKSUMS_FILE = "checksums.json"
CORRUPT_DIR = "corrupt"
LOCK_FILE = ".lock"
EVAL_DIR = "eval"


def root(path) -> epath.Path:
    """`path` (a workdir or a folder in one) as an ``epath.Path``, made absolute when local: Orbax refuses relative
    checkpoint paths, and a relative one (``--workdir=workdir/demo``) is what people type."""
    if not paths.is_local(path):  # gs:// and other remote paths are absolute already
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def checkpoints_dir(workdir) -> epath.Path:
    """``WORKDIR/checkpoints``, the folder Orbax's CheckpointManager owns."""
    return root(workdir) / CHECKPOINTS_DIR


def corrupt_dir(workdir) -> epath.Path:
    """``WORKDIR/checkpoints/corrupt``: where unreadable checkpoints are moved aside."""
    return checkpoints_dir(workdir) / CORRUPT_DIR


def lock_file(workdir) -> epath.Path:
    """``WORKDIR/.lock``: the lock of the run that writes to `workdir` (see ``idmr_jax.train.lock``)."""
    return root(workdir) / LOCK_FILE


def finished_steps(workdir) -> list[int]:
    """The steps of `workdir` whose checkpoint was completely written, ascending (empty if there are none)."""
    folder = checkpoints_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / STATE_ITEM).exists())


def latest_step(workdir) -> tuple[epath.Path, int]:
    """(step directory, step) of the newest finished checkpoint in `workdir`; FileNotFoundError if there is none."""
    steps = finished_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{checkpoints_dir(workdir)}: holds no finished checkpoint (no <step>/{STATE_ITEM}; "
                                "train first: python -m idmr_jax.main ... --workdir=...)")
    return checkpoints_dir(workdir) / str(steps[-1]), steps[-1]


def is_step_dir(path) -> bool:
    """True for ``WORKDIR/checkpoints/<step>`` (holds the ``state`` and ``config`` items)."""
    path = epath.Path(path)
    return path.name.isdigit() and (path / STATE_ITEM).is_dir() and (path / CONFIG_ITEM).is_dir()


def is_training_source(path) -> bool:
    """True if `path` is a training workdir (``checkpoints/<step>/``) or one of its step directories."""
    return is_step_dir(path) or checkpoints_dir(path).is_dir()


def find_checkpoint(path) -> tuple[epath.Path, int]:
    """(step directory, step) for a workdir (its latest finished step) or a step directory."""
    path = root(path)
    if is_step_dir(path):
        return path, int(path.name)
    if not checkpoints_dir(path).is_dir():
        raise FileNotFoundError(f"{path}: not a training workdir (no {CHECKPOINTS_DIR}/) nor a checkpoint step "
                                f"directory (no {STATE_ITEM}/ and {CONFIG_ITEM}/)")
    return latest_step(path)


def read_config(step_dir) -> ml_collections.ConfigDict:
    """The resolved training config saved with the checkpoint in `step_dir`."""
    import orbax.checkpoint as ocp  # slow to import; only readers of checkpoints need it

    step_dir = epath.Path(step_dir)
    if not (step_dir / CONFIG_ITEM).is_dir():
        raise FileNotFoundError(f"{step_dir}: no {CONFIG_ITEM}/ item (not written by idmr_jax.main?)")
    data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / CONFIG_ITEM)
    # Configs saved before config.precision carry per-module dtypes: map them to the policy they meant.
    return precision.upgrade_legacy_config(ml_collections.ConfigDict(data))
