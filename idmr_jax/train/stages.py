"""Training recipes in stages: one config, several runs, each starting from the one before.

A config with a ``stages`` field (e.g. ``configs/instructcir.py:demo``) is a recipe. ``stages`` is a list of
``(name, overrides)``, the overrides a list of ``(dotted field, value)`` laid over the config for that stage only
(after the command line's overrides, so a stage's own settings win); a value ``"config:<dotted field>"`` copies
that field of the config (e.g. each stage's ``data.train_dir`` from its own data field). Stage ``name`` runs in
``WORKDIR/<name>`` as a complete run of its own (checkpoints, metrics, evaluation), and
``model.init.path == PREVIOUS_STAGE`` means the
previous stage's workdir (with ``model.init.format = "workdir"``: its latest checkpoint). The results of every
stage are merged into ``WORKDIR/metrics.json`` under ``<name>/<metric>``, so the stages read side by side.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

PREVIOUS_STAGE = "<previous stage>"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Any]]) -> None:
    """Sets each ``(dotted field, value)`` of `overrides` in `config` (in place); a ``"config:<field>"`` value copies
    that field. ValueError naming an override whose field the config lacks."""
    for field, value in overrides:
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ValueError(f"stage override {field!r}: the config has no such field")
        if isinstance(value, str) and value.startswith("config:"):
            value = _field(config, value[len("config:"):])
        node[leaf] = copy.deepcopy(value)


def stage_config(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, Any]],
                 previous_workdir: str | None) -> ml_collections.ConfigDict:
    """`config` without ``stages``, with a stage's `overrides` applied and `PREVIOUS_STAGE` resolved."""
    out = copy.deepcopy(config)
    out.unlock()
    del out["stages"]
    apply_overrides(out, overrides)
    if out.model.init.path == PREVIOUS_STAGE:
        if previous_workdir is None:
            raise ValueError("the first stage cannot start from the previous stage (model.init.path)")
        out.model.init.path = previous_workdir
    return out


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def write_merged_results(workdir: str, results: dict) -> None:
    """``WORKDIR/metrics.json``: the merged results of a multi-run recipe (stages, the rerank loop), from process 0."""
    import jax
    from etils import epath

    if jax.process_index() == 0:
        path = epath.Path(workdir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def run_stages(config: ml_collections.ConfigDict, workdir: str,
               run_one: Callable[[ml_collections.ConfigDict, str], dict]) -> dict:
    """Runs each stage of ``config.stages`` with ``run_one(stage_config, stage_workdir) -> results`` and returns
    (and, on process 0, writes to ``WORKDIR/metrics.json``) every stage's results under ``<stage>/``."""
    results: dict[str, Any] = {}
    previous = None
    for name, overrides in config.stages:
        sub = os.path.join(workdir, name)
        print(f"\n=== stage {name}: {sub}")
        out = run_one(stage_config(config, overrides, previous), sub) or {}
        results.update({f"{name}/{k}": v for k, v in out.items()})
        previous = sub
    write_merged_results(workdir, results)
    return results
