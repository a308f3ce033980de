"""Orbax checkpoints of the train state, the data iterator and the resolved config, saved together.

Every process takes part in every save and restore: each writes its own shards of the (globally sharded)
state, and each saves its own data-iterator state (``data/process_<i>-of-<n>.json``), because with an input
pipeline sharded by process the positions differ per process. ``WORKDIR`` may be local or ``gs://``; on several
hosts it must be a directory they all see.

Once a save is final (Orbax finalised it and every process passed a barrier), process 0 writes the step's
checksums (:mod:`idmr_jax.train.integrity`). Resume order: the latest step, verified against its checksums, whose
config may be resumed (:mod:`idmr_jax.train.resume`) and which restores. A corrupt checkpoint (checksum mismatch,
missing file, unreadable) is moved aside to ``checkpoints/corrupt/<step>-<reason>`` and the previous one is tried;
a checkpoint that is intact but does not fit the state (another model shape) is an error, never a fallback. So is
a data state saved by a different number of processes: positions cannot be remapped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store  # not re-exported; Orbax's default handler uses it

from idmr_jax import runtime
from idmr_jax.train import integrity, resume
from idmr_jax.train import workdir as layout


class StatefulIterator(Protocol):
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class DataStateMismatchError(ValueError):
    """The checkpoint's data-iterator states were written by a different number of processes."""


class StateMismatchError(ValueError):
    """An intact checkpoint does not restore into the run's state (e.g. the model changed shape)."""


def _shapes(tree) -> dict[str, tuple]:
    """``{"params/…/kernel": shape}`` of a pytree of arrays or of Orbax's saved array metadata."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(name(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def shape_differences(step_dir, target) -> list[str]:
    """What differs between the arrays saved in ``step_dir/state`` (Orbax's metadata: no array is read) and the
    arrays of `target`: ``["path: saved (64, 128) -> now (32, 128)", "path: only in the checkpoint", ...]``."""
    saved_meta = ocp.StandardCheckpointer().metadata(epath.Path(step_dir) / layout.STATE_ITEM)
    saved, now = _shapes(getattr(saved_meta, "item_metadata", saved_meta)), _shapes(target)
    out = [f"{k}: saved {saved[k]} -> now {now[k]}" for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]
    out += [f"{k}: only in the checkpoint" for k in sorted(saved.keys() - now.keys())]
    out += [f"{k}: not in the checkpoint" for k in sorted(now.keys() - saved.keys())]
    return out


def _iterator_state_json(it: StatefulIterator) -> dict:
    state = it.get_state()
    if isinstance(state, bytes):  # grain's DataLoaderIterator serialises its state to JSON bytes
        return {"__bytes__": state.decode()}
    return state


def _restore_iterator(it: StatefulIterator, saved: dict) -> None:
    it.set_state(saved["__bytes__"].encode() if "__bytes__" in saved else saved)


def _process_file(directory: epath.Path) -> epath.Path:
    return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataStateHandler(ocp.CheckpointHandler):
    """Orbax handler for per-process JSON: every process writes and reads its own file in the item folder."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        _process_file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> dict:
        path = _process_file(directory)
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
            raise DataStateMismatchError(
                f"{path} does not exist (found {found}): this checkpoint's data-iterator states come from a "
                f"different number of processes than the {jax.process_count()} running now; resume with the "
                "same process count, or start a new workdir")
        return json.loads(path.read_text())


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# Replica-parallel saving splits a replicated array into one slice per replica, so that the replicas (hosts)
# write it together. Each slice shape is a compiled program, and a small array gains nothing from it: with
# Orbax's default (no minimum) the first save of the tiny AdaFocal's ~500 arrays compiled ~500 slice programs,
# 10 s of a 0.3 s save. An array whose per-replica slice would be under this size is written whole by one replica;
# bigger ones are still written in parallel.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 4 << 20


@functools.cache  # once per process
def use_replica_parallel_for_large_arrays_only() -> None:
    """Registers Orbax's ``jax.Array`` handler (process-wide) with replica-parallel saving kept for per-replica
    slices of at least :data:`MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` bytes; otherwise Orbax's default handler."""
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
    # Orbax warns on every override of a registered type; this one is intended, so keep it off the terminal.
    absl_logger = std_logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logger.setLevel(level)


class Checkpointer:
    """Async, keep-N checkpoints of {state, data iterator, config} under ``WORKDIR/checkpoints`` (layout:
    :mod:`idmr_jax.train.workdir`), with checksums written after each save and verified before each restore.

    `move_corrupt`: move corrupt checkpoints to ``checkpoints/corrupt/`` (training); False only skips them
    (evaluation, which may run on a read-only copy or next to the training run that owns the workdir).
    """

    def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 3, async_save: bool = True,
                 verify: bool = True, move_corrupt: bool = True):
        self.directory = layout.checkpoints_dir(workdir)
        self.verify, self.move_corrupt = verify, move_corrupt
        self._unchecksummed: int | None = None  # the step saved last, whose checksums are not written yet
        # Orbax's first cross-process sync (creating the directory) is a collective: line the processes up first.
        runtime.barrier("checkpointer")
        use_replica_parallel_for_large_arrays_only()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        )

    def save(self, step: int, state: Any, data_iterator: StatefulIterator | None, config: dict) -> None:
        self._finish_pending()
        items = {layout.STATE_ITEM: ocp.args.StandardSave(state), layout.CONFIG_ITEM: ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items[layout.DATA_ITEM] = DataStateSave(_iterator_state_json(data_iterator))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._unchecksummed = step

    def _finish_pending(self) -> None:
        """Waits for the last save to be final on every process, then process 0 writes its checksums."""
        if self._unchecksummed is None:
            return
        self.manager.wait_until_finished()
        runtime.barrier("checkpoint_final")  # every process's shards are written
        step_dir = self.directory / str(self._unchecksummed)
        if self.verify and jax.process_index() == 0 and step_dir.exists():
            integrity.write_checksums(step_dir)
        runtime.barrier("checkpoint_checksummed")
        self._unchecksummed = None

    def _corrupt(self, step: int, reason: str, slug: str) -> None:
        """Reports a corrupt checkpoint and moves it aside (process 0; the others wait and re-list the steps)."""
        where = ""
        if self.move_corrupt:
            if jax.process_index() == 0:
                where = f"; moved to {integrity.quarantine(self.directory / str(step), slug)}"
            runtime.barrier(f"quarantined_{step}")
            self.manager.reload()
        logging.warning("checkpoint at step %d in %s is unreadable (%s)%s", step, self.directory, reason, where)
        print(f"warning: checkpoint {step} is unreadable ({reason}){where}; falling back to the previous one")

    def restore_latest(self, target_state: Any, data_iterator: StatefulIterator | None,
                       config: dict | None = None) -> tuple[Any, int] | None:
        """Restores the newest intact checkpoint into `target_state`'s structure and shardings.

        `config`: the run's config as JSON; checked against each checkpoint's (``resume.check_config``) before
        anything is restored. None skips the check (evaluation).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.directory / str(step)
            problem = integrity.verify(step_dir) if self.verify else None
            if problem:
                self._corrupt(step, problem, "checksum")
                continue
            if config is not None:
                try:
                    saved = layout.read_config(step_dir)
                except Exception as e:  # noqa: BLE001 - an unreadable config item is a corrupt checkpoint
                    self._corrupt(step, f"config: {type(e).__name__}: {e}", "unreadable")
                    continue
                resume.check_config(saved.to_dict(), config, step=step, workdir=self.directory.parent)
            # A checkpoint of other shapes is intact: an error to report, never a reason to fall back.
            try:
                differences = shape_differences(step_dir, abstract)
            except Exception as e:  # noqa: BLE001 - unreadable metadata is a corrupt checkpoint
                self._corrupt(step, f"metadata: {type(e).__name__}: {str(e)[:300]}", "unreadable")
                continue
            if differences:
                shown = "\n".join(f"  {d}" for d in differences[:20])
                raise StateMismatchError(
                    f"checkpoint {step} in {self.directory} is intact but holds a state of another shape "
                    f"({len(differences)} arrays differ):\n{shown}\nthe model or optimiser changed shape: start a "
                    "new --workdir")
            items = {layout.STATE_ITEM: ocp.args.StandardRestore(abstract)}
            if data_iterator is not None:
                items[layout.DATA_ITEM] = DataStateRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except DataStateMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - the shapes fit, so the data could not be read: corrupt
                self._corrupt(step, f"{type(e).__name__}: {str(e)[:300]}", "unreadable")
                continue
            if data_iterator is not None:
                _restore_iterator(data_iterator, restored[layout.DATA_ITEM])
            return restored[layout.STATE_ITEM], step
        return None

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self.manager.close()


def restore_model_state(step_dir: str | epath.Path, target: dict) -> dict:
    """Reads only the model's fields of a saved TrainState (Orbax partial restore; the optimiser state is not read).

    `target`: ``{"params": ..., "frozen": ...}`` of ``jax.ShapeDtypeStruct`` carrying the shardings to restore
    into (see ``idmr_jax.train.setup.abstract_model_state``).
    """
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(os.fspath(epath.Path(step_dir) / layout.STATE_ITEM), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))


def config_to_json(config) -> dict:
    """The resolved ml_collections config as plain JSON (saved next to every checkpoint)."""
    return json.loads(config.to_json_best_effort())
