"""Orbax checkpoints of the train state, the data iterator and the resolved config, saved together.

Every process takes part in every save and restore: each writes its own shards of the (globally sharded)
state, and each saves its own data-iterator state (``data/process_<i>-of-<n>.json``), because with an input
pipeline sharded by process the positions differ per process. ``WORKDIR`` may be local or ``gs://``; on several
hosts it must be a directory they all see.

Resume order: the latest step whose checkpoint restores; an unreadable checkpoint (e.g. a run killed while it
was being finalised on a filesystem without atomic renames) is reported and the previous one is used. A data
state saved by a different number of processes is an error, not a fallback: positions cannot be remapped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from idmr_jax import runtime
from idmr_jax.train import workdir as layout


class StatefulIterator(Protocol):
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


class DataStateMismatchError(ValueError):
    """The checkpoint's data-iterator states were written by a different number of processes."""


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


class Checkpointer:
    """Async, keep-N checkpoints of {state, data iterator, config} under ``WORKDIR/checkpoints`` (layout:
    :mod:`idmr_jax.train.workdir`)."""

    def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = layout.checkpoints_dir(workdir)
        # Orbax's first cross-process sync (creating the directory) is a collective: line the processes up first.
        runtime.barrier("checkpointer")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        )

    def save(self, step: int, state: Any, data_iterator: StatefulIterator | None, config: dict) -> None:
        items = {layout.STATE_ITEM: ocp.args.StandardSave(state), layout.CONFIG_ITEM: ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items[layout.DATA_ITEM] = DataStateSave(_iterator_state_json(data_iterator))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, target_state: Any, data_iterator: StatefulIterator | None) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into `target_state`'s structure and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {layout.STATE_ITEM: ocp.args.StandardRestore(abstract)}
            if data_iterator is not None:
                items[layout.DATA_ITEM] = DataStateRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except DataStateMismatchError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, e)
                print(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); falling back to the previous one")
                continue
            if data_iterator is not None:
                _restore_iterator(data_iterator, restored[layout.DATA_ITEM])
            return restored[layout.STATE_ITEM], step
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
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
