"""Tasks: what a model family gives the shared trainer (model, loss, data, evaluation)."""

from __future__ import annotations

import ml_collections


def build(config: ml_collections.ConfigDict):
    """The task named by ``config.task``."""
    if config.task == "adafocal":
        from idmr_jax.tasks.oacir.task import AdaFocalTask

        return AdaFocalTask(config)
    if config.task == "idmr":
        from idmr_jax.tasks.idmr.task import IdmrTask

        return IdmrTask(config)
    raise ValueError(f"unknown task {config.task!r}")


def print_results(config: ml_collections.ConfigDict, results: dict) -> None:
    """A plain results table on stdout (process 0 only)."""
    import jax

    if jax.process_index() != 0:
        return
    width = max(len(k) for k in results)
    print(f"\n{config.task} results")
    for k, v in sorted(results.items()):
        print(f"  {k:<{width}}  {v:7.2f}")
