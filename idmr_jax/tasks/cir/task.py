"""The CIR evaluation task (config name ``cir``, `configs/cir_eval.py`): a trained or imported model of either
family evaluated on CIRR, CIRCO, FashionIQ and GeneCIS with the official protocols.

It is the model family's own task (``oacir`` for BLIP-2 / AdaFocal, ``idmr`` for the LLaVA embedder) for the
model, its weights and its mesh, with the CIR evaluation instead of the family's; it does not train. Weights come
from ``config.model.init``:

    format=workdir, path=TRAINING_WORKDIR   the latest checkpoint of a ``python -m idmr_jax.main`` run; the model is
                                            rebuilt from that run's saved config (so it always matches)
    format=lavis_adafocal | hf_blip2 | lavis_blip2 | hf_llava, path=...   a released checkpoint (the family's
                                            loader, `idmr_jax.tasks.oacir.pretrained`, `idmr_jax.tasks.idmr.task`)
    format=random                           the family's random init, on purpose (the ``tiny`` smoke model;
                                            `idmr_jax.train.state.RANDOM_INIT`)
"""

from __future__ import annotations

import copy
import functools

import ml_collections
from etils import epath

FAMILIES = {"qformer": "oacir", "mllm": "idmr"}  # config.cir.family -> the task that builds the model
INIT_FROM_WORKDIR = "workdir"


def family_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the family's task: `config` itself, or with ``init.format=workdir`` the training run's saved
    config with this run's evaluation, sharding, seed and CIR fields laid over it."""
    if config.cir.family not in FAMILIES:
        raise ValueError(f"unknown config.cir.family {config.cir.family!r}; choose from {sorted(FAMILIES)}")
    if config.model.init.format != INIT_FROM_WORKDIR:
        out = copy.deepcopy(config)
    else:
        from idmr_jax.train.workdir import find_checkpoint, read_config

        if not config.model.init.path:
            raise ValueError("config.model.init.format is 'workdir' but config.model.init.path is empty: give the "
                             "training workdir")
        saved = read_config(find_checkpoint(config.model.init.path)[0])
        out = ml_collections.ConfigDict(saved.to_dict())
        if out.task != FAMILIES[config.cir.family]:
            raise ValueError(f"{config.model.init.path} trained task {out.task!r}, but config.cir.family is "
                             f"{config.cir.family!r} (task {FAMILIES[config.cir.family]!r}): set cir.family")
        for field in ("eval", "sharding", "seed", "cir"):
            out[field] = copy.deepcopy(config[field])
        out.model.init = copy.deepcopy(config.model.init)
    out.task = FAMILIES[config.cir.family]
    out.mode = "eval"
    return out


class CirTask:
    """The CIR evaluation of a model family; see the module docstring and `idmr_jax.train.trainer.Task`."""

    def __init__(self, config: ml_collections.ConfigDict):
        from idmr_jax import tasks

        self.config = config
        self.family = tasks.build(family_config(config))
        self.frozen_patterns = self.family.frozen_patterns

    @functools.cached_property
    def model_config(self):
        """The family task's model config."""
        return self.family.model_config

    def build_model(self, seed=None):
        return self.family.build_model(seed)

    def bind_mesh(self, mesh):
        return self.family.bind_mesh(mesh)

    def load_pretrained(self, state, mesh):
        """The weights of ``config.model.init`` written into `state` (see the module docstring)."""
        init = self.config.model.init
        if init.format == INIT_FROM_WORKDIR:
            from idmr_jax.train.state import write_into_state
            from idmr_jax.weights.workdir import restore

            checkpoint = restore(init.path)
            state, loaded = write_into_state(state, checkpoint.flat, source=str(checkpoint.step_dir))
            print(f"loaded {len(loaded)} tensors from {checkpoint.step_dir}")
            return state
        return self.family.load_pretrained(state, mesh)

    def train_iterator(self):
        raise ValueError("the cir task evaluates; it does not train (config.mode must be 'eval')")

    def evaluate(self, model, workdir: epath.Path, step: int) -> dict:
        """Every benchmark of ``config.cir.benchmarks`` with converted shards; writes WORKDIR/eval/<bench>/."""
        from idmr_jax.tasks.cir.evaluate import evaluate_all

        return evaluate_all(self, model, workdir)


def family_task(config: ml_collections.ConfigDict) -> str:
    """The task whose model a cir config evaluates (``tasks.model_task_name``)."""
    if config.cir.family not in FAMILIES:
        raise ValueError(f"unknown config.cir.family {config.cir.family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[config.cir.family]


def model_kind(config: ml_collections.ConfigDict) -> str:
    """The model kind of a cir config: the family task's."""
    from idmr_jax import tasks

    return tasks.model_config_of(family_config(config))[0]


def model_config(config: ml_collections.ConfigDict):
    """The model config of a cir config: the family task's."""
    from idmr_jax import tasks

    family = family_config(config)
    return tasks.task_module(family).model_config(family)


TASK = CirTask
