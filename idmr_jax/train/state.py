"""The train state, its sharded creation and the jitted train step.

The model is split once into a static ``graphdef`` and three states: trainable params, frozen params (e.g. the
frozen ViT) and everything else (e.g. RNG counters). Only the trainable state is differentiated and updated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from idmr_jax import sharding as shd
from idmr_jax.models.init_keys import seed_as_data
from idmr_jax.weights import mapping

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State          # trainable
    frozen: nnx.State          # frozen params and non-param variables
    opt_state: optax.OptState
    rng: jax.Array             # base key; the step key is fold_in(rng, step), so resuming replays it exactly


def frozen_filter(patterns: Sequence[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter that is true for params whose ``/``-joined path matches any regex in `patterns`."""
    compiled = [re.compile(p) for p in patterns]

    def is_frozen(path, _):
        p = "/".join(str(k) for k in path)
        return any(rx.search(p) for rx in compiled)

    return is_frozen


def split_model(model: nnx.Module, frozen_patterns: Sequence[str]):
    """(graphdef, trainable params, frozen rest) of `model`."""
    trainable = nnx.All(nnx.Param, nnx.Not(frozen_filter(frozen_patterns)))
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    return graphdef, params, frozen


def create_train_state(build_model: Callable[[Any], nnx.Module], frozen_patterns: Sequence[str],
                       make_optimizer: Callable[[nnx.State], optax.GradientTransformation],
                       seed: int, mesh: Mesh, rules, *, abstract: bool = False
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """Creates the train state directly in its sharded layout (eval_shape, then jit with out_shardings).

    `build_model(seed)` builds the model from `seed` (see ``init_keys.seeded_model_rngs``); the state's base key
    is ``jax.random.key(seed)``. The seed enters the jitted init as an argument, not as a constant, so every seed
    runs the same compiled program: a run at a new seed reads it from the persistent compilation cache.

    Returns (graphdef, state, state_shardings). A full-size model never materialises on one device. With
    `abstract`, nothing is allocated: the state's arrays are ``jax.ShapeDtypeStruct`` with their shardings (to
    compile a step, and read its memory needs, before or instead of running it).
    """

    graphdefs = []  # the model's static structure, kept from the first trace (tracing a constructor is not free)

    def init(seed_value: jax.Array) -> TrainState:
        model = build_model(seed_value)
        graphdef, params, frozen = split_model(model, frozen_patterns)
        graphdefs.append(graphdef)
        opt_state = make_optimizer(params).init(params)
        rng = jax.random.key_data(jax.random.key(seed_value))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=opt_state, rng=rng)

    seed_value = seed_as_data(seed)
    shapes = jax.eval_shape(init, seed_value)
    shardings = shd.state_shardings(shapes, mesh, rules)
    if abstract:
        return graphdefs[0], shd.abstract_arrays(shapes, mesh, rules), shardings
    return graphdefs[0], jax.jit(init, out_shardings=shardings)(seed_value), shardings


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    lr_schedules: dict[str, optax.Schedule], state_shardings, batch_sharding) -> Callable:
    """One jitted update ``(state, batch) -> (state, metrics)`` with the state donated."""

    def step(state: TrainState, batch: dict):
        step_rng = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            # Fresh Variable objects for this trace: the loss may reseed / advance RNG variables, which NNX
            # only allows on variables created at the current trace level.
            frozen = jax.tree.map(lambda x: x, state.frozen)
            model = nnx.merge(graphdef, params, frozen)
            return loss_fn(model, batch, step_rng)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            **{f"lr/{name}": sched(state.step) for name, sched in lr_schedules.items()},
            **aux,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    # Metrics are scalars: leave their placement to the compiler.
    return jax.jit(step, donate_argnums=(0,), in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None))


def batch_shardings(mesh: Mesh, rules, batch_example: dict) -> dict:
    """Shards every batch array on its leading (batch) axis over the mesh's batch axes."""
    spec = shd.logical_to_pspec(("batch",), rules)
    return {k: NamedSharding(mesh, PartitionSpec(*spec, *([None] * (v.ndim - 1)))) for k, v in batch_example.items()}


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """The variables of `state` by ``/``-joined path (``"blip2/qformer/layers/0/..."``)."""
    return {"/".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


# ``config.model.init.format`` for the model's own random initialisation, asked for by name (smoke runs, tests):
# the families load nothing for it, and an evaluation accepts it instead of refusing to score random weights.
RANDOM_INIT = "random"


def write_into_state(train_state: TrainState, flat: Mapping[str, np.ndarray], *, source: str
                     ) -> tuple[TrainState, list[str]]:
    """Writes converted params (trainable or frozen, by flat path) into `train_state` on their existing shardings.

    Per-layer tensors (``layers/0/...``) are stacked for scanned modules. Returns (the state, the written paths);
    a path whose shape differs from the model's raises :class:`~idmr_jax.weights.mapping.WeightMismatchError`.
    """
    targets = {**flat_variables(train_state.params), **flat_variables(train_state.frozen)}
    model_shapes = {k: v.get_value() for k, v in targets.items()}
    covered = {path: value for path, value in flat.items() if path in targets}
    rest = {k: v for k, v in flat.items() if k not in covered}
    if rest:
        # Stack per-layer tensors for scanned modules, restricted to the params this checkpoint covers.
        want = {k: model_shapes[k] for k in model_shapes
                if k not in covered and mapping.stacked_layer_keys(k, rest)}
        covered.update(mapping.stack_for_model(rest, want, source=source))
    for path, value in covered.items():
        var = targets[path]
        current = var.get_value()
        if tuple(np.shape(value)) != tuple(current.shape):
            raise mapping.WeightMismatchError(
                f"{source}: {path!r} has shape {tuple(np.shape(value))}, the model expects {tuple(current.shape)}")
        var.set_value(jax.device_put(np.asarray(value).astype(current.dtype), current.sharding))
    logging.info("%s: loaded %d tensors", source, len(covered))
    return train_state, sorted(covered)
