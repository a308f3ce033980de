"""From a task to a sharded train state: mesh, logical rules, optimiser and the state, built one way for everyone.

    mesh, rules  <- config.sharding (or a mesh given by the caller, e.g. a benchmark over fewer devices)
    optimiser    <- config.optim over the trainable params, read from the state's first (abstract) trace
    state        <- create_train_state: initialised directly in its sharded layout from config.seed (passed as data)

The trainer (training and evaluation), the step benchmarks and the interactive retriever all start here, so a
state built by one is the state built by the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax import nnx
from jax.sharding import Mesh

from idmr_jax import sharding as shd
from idmr_jax.train import optim
from idmr_jax.train.state import TrainState, create_train_state, split_model


@dataclasses.dataclass
class Setup:
    """Everything a train or eval loop needs besides the data: where the state lives and how it is updated."""

    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    state: TrainState
    state_shardings: TrainState
    optimizer: optax.GradientTransformation
    schedules: dict[str, optax.Schedule]  # learning-rate schedules by param group, for the step's metrics


def setup_state(task, *, total_steps: int, mesh: Mesh | None = None, abstract: bool = False) -> Setup:
    """The sharded train state of `task` (freshly initialised) and its optimiser over `total_steps`.

    `task`: anything with ``config``, ``build_model()`` and ``frozen_patterns`` (see ``trainer.Task``).
    `mesh`: defaults to ``config.sharding.mesh`` over all devices. `abstract`: the state as sharded
    ``jax.ShapeDtypeStruct`` only, nothing allocated (see ``create_train_state``).
    """
    config = task.config
    mesh = mesh if mesh is not None else shd.mesh_from_config(config)
    rules = shd.rules_from_config(config)
    built = {}

    def make_optimizer(trainable: nnx.State) -> optax.GradientTransformation:
        # Built once, from the first trace's params: their paths name the param groups, nothing else is read.
        if not built:
            built["optimizer"], built["schedules"] = optim.make_optimizer(config.optim, trainable, total_steps)
        return built["optimizer"]

    with shd.axis_rules(mesh, rules):
        graphdef, state, state_shardings = create_train_state(
            task.build_model, task.frozen_patterns, make_optimizer, config.seed, mesh, rules, abstract=abstract)
    return Setup(mesh=mesh, rules=rules, graphdef=graphdef, state=state, state_shardings=state_shardings,
                 optimizer=built["optimizer"], schedules=built["schedules"])


def abstract_model_state(task, mesh: Mesh, rules) -> tuple[nnx.GraphDef, dict[str, Any]]:
    """(graphdef, ``{"params", "frozen"}``): the model's fields of the train state as ``jax.ShapeDtypeStruct``
    with the shardings :func:`setup_state` gives them, without allocating anything (a target for
    ``checkpoint.restore_model_state``: inference needs the weights, not the optimiser state)."""
    with shd.axis_rules(mesh, rules):
        graphdef, params, frozen = split_model(nnx.eval_shape(task.build_model), task.frozen_patterns)
    target = {"params": params, "frozen": frozen}  # the TrainState fields that make the model
    return graphdef, shd.abstract_arrays(target, mesh, rules)
