"""Reading training workdirs: the model config and params of a checkpoint written by ``python -m idmr_jax.main``.

The layout of a workdir (``WORKDIR/checkpoints/<step>/{state,config,data}``) belongs to
:mod:`idmr_jax.train.workdir`; its lookups are re-exported here for the export path. :func:`restore` takes either
the workdir (its latest step) or one step directory, rebuilds the model config from the saved config through the
task registry (``idmr_jax.tasks.model_config_of``) and reads only the model params of the ``state`` item (a
``TrainState``: trainable ``params``, ``frozen`` params and RNG variables): the optimiser state is never read.
Every param of the rebuilt model must be in the checkpoint with the same shape, or the error names it. Paths may
be local or ``gs://`` (etils.epath).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from idmr_jax import tasks
from idmr_jax.train.workdir import (  # noqa: F401 - the layout lookups, re-exported for the export path
    CHECKPOINTS_DIR,
    CONFIG_ITEM,
    STATE_ITEM,
    find_checkpoint,
    is_step_dir,
    is_training_source,
    read_config,
)
from idmr_jax.weights import io
from idmr_jax.weights.mapping import WeightMismatchError, flatten_params

# TrainState fields that hold model variables: trainable params, and frozen params next to RNG variables.
_PARAM_ITEMS = ("params", "frozen")


@dataclasses.dataclass(frozen=True)
class TrainedCheckpoint:
    """One training checkpoint's model: ``flat`` maps flax param paths (``blip2/qformer/...``) to numpy arrays
    in the module's own layout (stacked along a leading axis where the config scans layers)."""

    step_dir: epath.Path
    step: int
    config: ml_collections.ConfigDict  # the resolved training config
    kind: str  # the model kind (weights.io.MODEL_KINDS), e.g. "adafocal"
    model_config: Any  # e.g. an AdaFocalConfig
    flat: dict[str, np.ndarray]


def build_abstract(kind: str, cfg) -> nnx.Module:
    """The module of `cfg` as abstract arrays (nothing is allocated; fine for ViT-g)."""
    _, model_cls = io.model_classes(kind)
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def _host_device():
    try:
        return jax.devices("cpu")[0]  # keep a 1B-param model off the accelerator: export only needs host arrays
    except RuntimeError:
        return jax.local_devices()[0]


def _leaf_metadata(tree: Any, keys: list[str]) -> Any:
    node = tree
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def restore(path) -> TrainedCheckpoint:
    """Reads the model params (trainable and frozen, no optimiser state) of a training checkpoint.

    `path`: a training workdir (its latest step is used) or ``WORKDIR/checkpoints/<step>``.
    """
    import orbax.checkpoint as ocp

    step_dir, step = find_checkpoint(path)
    config = read_config(step_dir)
    kind, cfg = tasks.model_config_of(config)
    model_params = flatten_params(nnx.state(build_abstract(kind, cfg), nnx.Param))

    state_dir = step_dir / STATE_ITEM
    meta = ocp.StandardCheckpointer().metadata(state_dir)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
    device = jax.sharding.SingleDeviceSharding(_host_device())
    target: dict = {}
    where: dict[str, tuple[str, ...]] = {}
    for p, abstract in model_params.items():
        keys = p.split("/")
        for item in _PARAM_ITEMS:
            leaf = _leaf_metadata(tree, [item, *keys, "value"])
            if leaf is not None:
                break
        else:
            raise WeightMismatchError(f"{state_dir}: model param {p!r} is in neither params/ nor frozen/ of the "
                                      f"checkpoint (was it written with another config?)")
        if tuple(leaf.shape) != tuple(abstract.shape):
            raise WeightMismatchError(f"{state_dir}: {item}/{p} has shape {tuple(leaf.shape)}, the model of the "
                                      f"saved config expects {tuple(abstract.shape)}")
        node = target
        for k in (item, *keys):
            node = node.setdefault(k, {})
        node["value"] = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device)
        where[p] = (item, *keys, "value")
    # Trainable params are all model params: anything else under params/ means the config does not match.
    extra = sorted(p for p in _value_paths(tree.get("params", {})) if p not in model_params)
    if extra:
        raise WeightMismatchError(f"{state_dir}: trainable params unknown to the model of the saved config: "
                                  f"{extra[:8]}")

    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target)
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
    flat = {}
    for p, keys in where.items():
        node = restored
        for k in keys:
            node = node[k]
        flat[p] = np.asarray(node)
    return TrainedCheckpoint(step_dir=step_dir, step=step, config=config, kind=kind, model_config=cfg, flat=flat)


def _value_paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[str]:
    """``a/b`` for every ``a/b/value`` leaf of a checkpoint metadata tree."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "value" and not isinstance(v, dict):
                out.append("/".join(prefix))
            else:
                out += _value_paths(v, prefix + (str(k),))
    return out


def load_module(kind: str, cfg, flat: dict[str, np.ndarray], *, seed: int = 0, source: str = "checkpoint",
                fresh: Sequence[str] = ()) -> nnx.Module:
    """A module of `cfg` holding `flat` (per-layer paths are stacked for scanned layers).

    Strict: every param must be in `flat` with its shape, except the paths listed in `fresh`, which get their
    init from `seed` (and must then be absent); only those inits are computed (under jit XLA drops every other
    initialiser, so a ViT-g is allocated once). The non-param state, dropout RNG streams, is seeded from `seed`
    with one independent key per stream: export and inference are deterministic and never read it.
    """
    import jax.numpy as jnp

    from idmr_jax.weights.mapping import stack_for_model, unflatten_params

    _, model_cls = io.model_classes(kind)
    graphdef, params, abstract_rest = nnx.split(build_abstract(kind, cfg), nnx.Param, ...)
    wanted = flatten_params(params)
    fresh = tuple(fresh)
    given = [p for p in fresh if p in flat]
    if given:
        raise WeightMismatchError(f"{source}: {given} are both given and to be freshly initialised")

    def init():
        values = flatten_params(nnx.state(model_cls(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
        return {p: values[p] for p in fresh}

    fresh_values = jax.jit(init)() if fresh else {}
    rest = _seeded_rng_state(abstract_rest, seed)
    arranged = stack_for_model({**flat, **fresh_values}, wanted, source=source)
    nnx.replace_by_pure_dict(params, unflatten_params(
        {k: jnp.asarray(v, dtype=wanted[k].dtype) for k, v in arranged.items()}))
    return nnx.merge(graphdef, params, rest)


def _seeded_rng_state(abstract_rest, seed: int):
    """Concrete values for abstract non-param state: RNG keys from `seed` (one per leaf), counters at 0."""
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(abstract_rest)
    base = jax.random.key(seed)
    out = []
    for i, a in enumerate(leaves):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            key = jax.random.fold_in(base, i)
            out.append(jax.random.split(key, a.shape) if a.shape else key)
        else:
            out.append(jnp.zeros(a.shape, a.dtype))
    return jax.tree.unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model to export: its kind, config dataclass, flat params (module layout) and where it came from."""

    kind: str
    model_config: Any
    flat: dict[str, np.ndarray]
    provenance: dict
    max_text_len: int | None = None  # the training text length, when a training config says it


def read_source(path) -> ModelSource:
    """A training workdir, one of its step directories, or a converted model directory (``model_config.json``
    + ``params/``, see ``idmr_jax.weights.io``), read as a :class:`ModelSource`."""
    if is_training_source(path):
        ck = restore(path)
        return ModelSource(ck.kind, ck.model_config, ck.flat,
                           {"training_checkpoint": str(ck.step_dir), "step": ck.step},
                           max_text_len=ck.config.get("data", {}).get("max_text_len"))
    if not (epath.Path(path) / io.MODEL_CONFIG_FILE).exists():
        raise FileNotFoundError(f"{path}: neither a training workdir ({CHECKPOINTS_DIR}/<step>/), a checkpoint step "
                                f"directory ({STATE_ITEM}/ + {CONFIG_ITEM}/), nor a converted model directory "
                                f"({io.MODEL_CONFIG_FILE} + params/)")
    kind, cfg, flat = io.restore_params(path)
    return ModelSource(kind, cfg, flat, {"converted_model": str(path)})
