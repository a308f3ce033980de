"""Tasks: what a model family gives the shared trainer (model, loss, data, evaluation), one folder each.

The registry below maps a task name to its folder. Every task folder follows one convention, so that adding a task
is one new folder and one line in `TASKS`:

    idmr_jax/tasks/<name>/task.py   TASK (the class implementing ``idmr_jax.train.trainer.Task``), MODEL_KIND
                                    (``idmr_jax.weights.io.MODEL_KINDS``) or model_kind(config) where the
                                    config decides it, model_config(config)
    idmr_jax/tasks/<name>/demo.py   prepare(config) -> (train_dir, val_dir): builds the laptop demo's data
"""

from __future__ import annotations

import copy
import importlib
from types import ModuleType
from typing import Any

import ml_collections

# Task name -> its folder (a package under idmr_jax/tasks/).
TASKS = {"oacir": "idmr_jax.tasks.oacir", "idmr": "idmr_jax.tasks.idmr", "cir": "idmr_jax.tasks.cir",
         "universal": "idmr_jax.tasks.universal", "rerank": "idmr_jax.tasks.rerank"}
# Names that configs and checkpoints written before a rename still carry: "adafocal" was the OACIR task's name.
LEGACY_NAMES = {"adafocal": "oacir"}


def task_name(config: ml_collections.ConfigDict) -> str:
    """The task of a config (legacy names mapped to today's); ValueError for an unknown task."""
    name = config.get("task")
    name = LEGACY_NAMES.get(name, name)
    if name not in TASKS:
        raise ValueError(f"unknown task {config.get('task')!r}; known: {sorted(TASKS)}")
    return name


def model_task_name(config: ml_collections.ConfigDict) -> str:
    """The task whose model `config` builds: its own, or, for a task that evaluates another task's models (``cir``:
    its ``family_task(config)``), that one. Model-level settings (precision parts, weight formats) follow it."""
    module = task_module(config)
    return module.family_task(config) if hasattr(module, "family_task") else task_name(config)


def task_module(config: ml_collections.ConfigDict, part: str = "task") -> ModuleType:
    """One module of the config's task folder, e.g. ``task_module(config, "demo")``."""
    return importlib.import_module(f"{TASKS[task_name(config)]}.{part}")


def build(config: ml_collections.ConfigDict):
    """The task named by ``config.task``. Building it has no side effects (see `prepare_data`)."""
    return task_module(config).TASK(config)


def model_config_of(config: ml_collections.ConfigDict) -> tuple[str, Any]:
    """(model kind, model config dataclass) of a training config, e.g. one saved with a checkpoint.

    Only the model config is built (no task, data or tokenizer): this is what export rebuilds a trained model from.
    """
    module = task_module(config)
    kind = module.model_kind(config) if hasattr(module, "model_kind") else module.MODEL_KIND
    return kind, module.model_config(config)


def prepare_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config to train on, with its data made ready: an explicit step before `build`.

    For ``config.data.source == "demo"`` the task's demo data (``idmr_jax.tasks.<task>.demo``) is built or reused
    on process 0 while every other process waits at a barrier; the result is a copy of ``config`` that reads it
    (``source="arrayrecord"``, ``train_dir``, ``val_dir``). Any other source is returned as is."""
    if config.data.source != "demo":
        return config
    from idmr_jax import runtime

    train_dir, val_dir = task_module(config, "demo").prepare(config)
    runtime.barrier("demo_data")  # the other processes read what process 0 just wrote
    prepared = copy.deepcopy(config)
    prepared.data.source, prepared.data.train_dir, prepared.data.val_dir = "arrayrecord", train_dir, val_dir
    return prepared


def print_results(config: ml_collections.ConfigDict, results: dict) -> None:
    """The results table on stdout: a row per subset, a column per metric (process 0 only)."""
    import jax

    from idmr_jax.train.metric_writer import results_table

    if jax.process_index() == 0:
        print("\n" + results_table(results, f"{config.task} results"))
