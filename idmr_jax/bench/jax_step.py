"""The JAX side of the step benchmarks: the trainer's own sharded train state and jitted, donated update.

Nothing here re-implements the trainer: the state comes from `idmr_jax.train.state.create_train_state`, the step
from `make_train_step` with the task's loss (`OacirTask.loss_fn`), the optimiser from the config's recipe, and
the batch from the synthetic source (`idmr_jax.tasks.oacir.fake`) placed on the mesh once, so a timing covers the
update alone (the `input` suite measures the data side).

Cached ViT features (``vit_cache=True``): the recipe freezes the ViT and trains without augmentation, so each
image's ViT output never changes and can be computed once per image instead of twice per example and step. The
batch then carries the ViT tokens (``ref_tokens``/``tgt_tokens``, computed here by the model's own ViT) and the
step runs the task's unchanged loss with the ViT swapped for the identity (``ln_vision`` and everything after it
still run and train).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from idmr_jax import sharding as shd
from idmr_jax.bench import configs
from idmr_jax.tasks.oacir import fake
from idmr_jax.train.setup import setup_state
from idmr_jax.train.state import batch_shardings, make_train_step
from idmr_jax.train.trainer import global_batch

# The optimiser schedule's length: only its shape matters for timing.
_SCHEDULE_STEPS = 1000


@dataclasses.dataclass
class JaxStep:
    """A ready-to-run train step; `run()` advances `state` by one update on the fixed `batch`."""

    config: ml_collections.ConfigDict
    task: Any
    mesh: Any
    rules: tuple
    graphdef: Any
    state: Any
    step_fn: Any
    batch: dict
    local_batch: dict
    vit_cache: bool = False
    pixel_batch: dict | None = None  # the host batch with pixels (== local_batch unless vit_cache)

    def run(self):
        with shd.axis_rules(self.mesh, self.rules):
            self.state, metrics = self.step_fn(self.state, self.batch)
        return metrics

    def sync(self, metrics) -> None:
        jax.block_until_ready((self.state.step, metrics))

    def compile(self):
        """Compiles the step ahead of time and runs that executable from now on (one compilation serves the
        cost analysis and the timings). Returns the compiled executable."""
        if isinstance(self.step_fn, jax.stages.Compiled):
            return self.step_fn
        with shd.axis_rules(self.mesh, self.rules):
            compiled = self.step_fn.lower(self.state, self.batch).compile()
        self.step_fn = compiled
        return compiled

    @property
    def batch_size(self) -> int:
        return int(self.config.data.batch_size)

    def model(self) -> nnx.Module:
        """The model with the current weights (a view on the state; do not keep it across `run` calls)."""
        return nnx.merge(self.graphdef, self.state.params, self.state.frozen)

    def param_counts(self) -> dict:
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
        return {"trainable": count(self.state.params), "frozen": count(nnx.state(self.state.frozen, nnx.Param))}


# Steps built in this process, by (config, devices): suites run one after another in one process (the tests) share
# one build and one compilation. The state keeps advancing; timings do not depend on the weights' values.
_BUILT: dict[tuple, JaxStep] = {}


def build(config: ml_collections.ConfigDict, *, devices: int | None = None, vit_cache: bool = False,
          reuse: bool = True) -> JaxStep:
    """The train state, the jitted step and one batch on the mesh for `config` (any AdaFocal config).

    `devices`: use only the first n devices (a data-parallel mesh over them); default: the config's mesh.
    `vit_cache`: the batch carries the frozen ViT's output instead of pixels (see the module docstring).
    `reuse`: return the step already built in this process for the same arguments, if any.
    """
    key = (config.to_json(sort_keys=True), devices, vit_cache)
    if reuse and key in _BUILT:
        return _BUILT[key]
    _BUILT[key] = step = _build(config, devices, vit_cache)
    return step


class _CachedVision(nnx.Module):
    """Stands in for the frozen ViT when its output is cached: returns its input as the tokens."""

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid

    def __call__(self, tokens, *, deterministic: bool = True):
        from idmr_jax.models.vit import VisionOutput

        return VisionOutput(tokens=tokens, grid=self.grid)


def step_loss(task, mesh, vit_cache: bool):
    """The task's loss bound to `mesh`; with `vit_cache`, on batches that hold the frozen ViT's tokens."""
    loss_fn = task.bind_mesh(mesh)
    if not vit_cache:
        return loss_fn
    from idmr_jax.models.adafocal import grid

    return _cached_vit_loss(loss_fn, grid(task.model_config))


def _cached_vit_loss(loss_fn, grid: tuple[int, int]):
    """`loss_fn` (the task's) on a batch holding ViT tokens: the model's ViT is replaced by the identity inside
    the traced step only (the merged model is the step's own copy) and the tokens go where the pixels went."""

    def loss(model, batch, rng):
        model.blip2.vision = _CachedVision(grid)
        view = {k: v for k, v in batch.items() if k not in ("ref_tokens", "tgt_tokens")}
        view["ref_pixels"], view["tgt_pixels"] = batch["ref_tokens"], batch["tgt_tokens"]
        return loss_fn(model, view, rng)

    return loss


def vit_tokens(step: "JaxStep", pixels) -> jax.Array:
    """The frozen ViT's output tokens (before ``ln_vision``) for `pixels` on the step's mesh."""
    graphdef, frozen = step.graphdef, step.state.frozen

    def encode(params, frozen, x):
        model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, frozen))
        return model.blip2.vision(x).tokens

    with shd.axis_rules(step.mesh, step.rules):
        return jax.jit(encode)(step.state.params, frozen, pixels)


def _build(config: ml_collections.ConfigDict, devices: int | None, vit_cache: bool) -> JaxStep:
    task = configs.make_task(config)
    if devices:
        mesh = shd.make_mesh({"data": devices, "fsdp": 1, "model": 1}, devices=jax.devices()[:devices])
    else:
        mesh = shd.mesh_from_config(config)
    bs = int(config.data.batch_size)
    if bs % mesh.size:
        raise ValueError(f"batch size {bs} does not divide over {mesh.size} devices")
    setup = setup_state(task, total_steps=_SCHEDULE_STEPS, mesh=mesh)
    rules, graphdef, state = setup.rules, setup.graphdef, setup.state
    with shd.axis_rules(mesh, rules):
        local = next(fake.FakeIterator(task.fake_spec(), bs, jax.process_index(), jax.process_count()))
        batch_sh = batch_shardings(mesh, rules, local)
        batch = global_batch(local, batch_sh)
    step = JaxStep(config=config, task=task, mesh=mesh, rules=rules, graphdef=graphdef, state=state,
                   step_fn=None, batch=batch, local_batch=local, vit_cache=vit_cache, pixel_batch=local)
    if vit_cache:
        if not config.model.freeze_vision:
            raise ValueError("cached ViT features need a frozen ViT (config.model.freeze_vision)")
        tokens = {f"{side}_tokens": vit_tokens(step, batch[f"{side}_pixels"]) for side in ("ref", "tgt")}
        local = {**{k: v for k, v in local.items() if not k.endswith("_pixels")},
                 **{k: np.asarray(jax.device_get(v)) for k, v in tokens.items()}}
        batch_sh = batch_shardings(mesh, rules, local)
        with shd.axis_rules(mesh, rules):
            batch = global_batch(local, batch_sh)
        step.batch, step.local_batch = batch, local
    with shd.axis_rules(mesh, rules):
        step.step_fn = make_train_step(graphdef, step_loss(task, mesh, vit_cache), setup.optimizer, setup.schedules,
                                       setup.state_shardings, batch_sh)
    return step


def describe(config: ml_collections.ConfigDict, step: JaxStep | None = None) -> dict:
    """The model sizes a result refers to (ViT, Q-Former, CAAM, batch, dtypes)."""
    mc = configs.model_config(config)
    v, q = mc.blip2.vision, mc.blip2.qformer
    vision = {"kind": type(v).__name__, "dtype": getattr(v, "dtype", "float32")}
    if hasattr(v, "width"):
        vision.update(width=v.width, depth=getattr(v, "depth", None), heads=getattr(v, "num_heads", None),
                      mlp=getattr(v, "mlp_dim", None), patch=getattr(v, "patch_size", None),
                      remat=getattr(v, "remat", None), scan=getattr(v, "scan", None))
    out = {
        "image_size": mc.image_size, "batch_size": int(config.data.batch_size),
        "vision": vision, "frozen_vision": bool(config.model.freeze_vision),
        "qformer": {"width": q.hidden_size, "layers": q.num_layers, "heads": q.num_heads,
                    "mlp": q.intermediate_size, "cross_attention_freq": q.cross_attention_freq, "dtype": q.dtype,
                    "dropout": q.hidden_dropout, "remat": q.remat},
        "num_query_tokens": mc.blip2.num_query_tokens, "embed_dim": mc.blip2.embed_dim,
        "text_len": int(config.data.max_text_len), "beta_mode": mc.beta_mode,
    }
    if step is not None:
        out["params"] = step.param_counts()
        out["devices"] = int(step.mesh.size)
    return out
