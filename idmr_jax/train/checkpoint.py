"""Orbax checkpoints of the train state, the data iterator and the resolved config, saved together.

Resume order: the latest step whose checkpoint restores; an unreadable checkpoint (e.g. a run killed while it
was being finalised on a filesystem without atomic renames) is reported and the previous one is used.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class StatefulIterator(Protocol):
    def get_state(self) -> Any: ...
    def set_state(self, state: Any) -> None: ...


def _iterator_state_json(it: StatefulIterator) -> dict:
    state = it.get_state()
    if isinstance(state, bytes):  # grain's DataLoaderIterator serialises its state to JSON bytes
        return {"__bytes__": state.decode()}
    return state


def _restore_iterator(it: StatefulIterator, saved: dict) -> None:
    it.set_state(saved["__bytes__"].encode() if "__bytes__" in saved else saved)


class Checkpointer:
    """Async, keep-N checkpoints of {state, data iterator, config} under ``WORKDIR/checkpoints``."""

    def __init__(self, workdir: str | epath.Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save),
        )

    def save(self, step: int, state: Any, data_iterator: StatefulIterator | None, config: dict) -> None:
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(_iterator_state_json(data_iterator))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, target_state: Any, data_iterator: StatefulIterator | None) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint into `target_state`'s structure and shardings."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {"state": ocp.args.StandardRestore(abstract)}
            if data_iterator is not None:
                items["data"] = ocp.args.JsonRestore()
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous one
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, e)
                print(f"warning: checkpoint {step} is unreadable ({type(e).__name__}); falling back to the previous one")
                continue
            if data_iterator is not None:
                _restore_iterator(data_iterator, restored["data"])
            return restored["state"], step
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_to_json(config) -> dict:
    """The resolved ml_collections config as plain JSON (saved next to every checkpoint)."""
    return json.loads(config.to_json_best_effort())
