"""Tasks: what a model family gives the shared trainer (model, loss, data, evaluation)."""

from __future__ import annotations

from typing import Any

import ml_collections


# Task names configs may carry -> the task's folder. "adafocal" is the OACIR task's name in configs (and
# checkpoints) written before it was called "oacir".
TASK_NAMES = {"oacir": "oacir", "adafocal": "oacir", "idmr": "idmr"}
# Task -> the model kind of its model (``idmr_jax.weights.io.MODEL_KINDS``), what export and convert rebuild.
MODEL_KINDS = {"oacir": "adafocal", "idmr": "llava"}


def task_name(config: ml_collections.ConfigDict) -> str:
    """The task of a config, ``oacir`` or ``idmr`` (legacy names mapped); ValueError for an unknown task."""
    name = config.get("task")
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASK_NAMES)}")
    return TASK_NAMES[name]


def build(config: ml_collections.ConfigDict):
    """The task named by ``config.task``."""
    name = task_name(config)
    if name == "oacir":
        from idmr_jax.tasks.oacir.task import OacirTask

        return OacirTask(config)
    from idmr_jax.tasks.idmr.task import IdmrTask

    return IdmrTask(config)


def model_config_of(config: ml_collections.ConfigDict) -> tuple[str, Any]:
    """(model kind, model config dataclass) of a training config, e.g. one saved with a checkpoint.

    Only the model config is built (no task, data or tokenizer): this is what export rebuilds a trained model from.
    """
    name = task_name(config)
    if name == "oacir":
        from idmr_jax.tasks.oacir.task import model_config
    else:
        from idmr_jax.tasks.idmr.task import model_config
    return MODEL_KINDS[name], model_config(config.model)


def prepare_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config to train on, with its data made ready: an explicit step before `build`.

    For ``config.data.source == "demo"`` the task's demo data (`idmr_jax.tasks.oacir.demo`,
    `idmr_jax.tasks.idmr.demo`) is built or reused on process 0 while every other process waits at a barrier; the
    result is a copy of ``config`` that reads it (``source="arrayrecord"``, ``train_dir``, ``val_dir``). Any other
    source is returned as is."""
    if config.data.source != "demo":
        return config
    import copy

    from idmr_jax import runtime

    if task_name(config) == "oacir":
        from idmr_jax.tasks.oacir import demo
    else:
        from idmr_jax.tasks.idmr import demo
    train_dir, val_dir = demo.prepare(config)
    runtime.barrier("demo_data")  # the other processes read what process 0 just wrote
    prepared = copy.deepcopy(config)
    prepared.data.source, prepared.data.train_dir, prepared.data.val_dir = "arrayrecord", train_dir, val_dir
    return prepared


def print_results(config: ml_collections.ConfigDict, results: dict) -> None:
    """A plain results table on stdout (process 0 only)."""
    import jax

    if jax.process_index() != 0:
        return
    width = max(len(k) for k in results)
    print(f"\n{config.task} results")
    for k, v in sorted(results.items()):
        print(f"  {k:<{width}}  {v:7.2f}")
