"""Optimiser recipes: optax AdamW with parameter groups, learning-rate and momentum schedules.

Groups are chosen by regexes over ``/``-joined param paths (first match wins), e.g. AdaFocal's paper recipe
trains CAAM at 1e-4 and everything else at 1e-5. The released recipe is one group with PyTorch's
``OneCycleLR`` (cosine annealing, ``div_factor=100``, ``final_div_factor=1e4``) including its default momentum
cycling, which for AdamW moves beta1 between 0.95 and 0.85 opposite to the learning rate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx


def lr_schedule(cfg: ml_collections.ConfigDict, peak: float, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule by name: constant, warmup_cosine or onecycle (PyTorch OneCycleLR semantics)."""
    kind = cfg.schedule
    warmup = int(cfg.get("warmup_steps", 0))
    if kind == "constant":
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
        return optax.constant_schedule(peak)
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total_steps, warmup + 1))
    if kind == "onecycle":
        return optax.cosine_onecycle_schedule(
            transition_steps=total_steps, peak_value=peak, pct_start=float(cfg.pct_start),
            div_factor=float(cfg.div_factor), final_div_factor=float(cfg.final_div_factor))
    raise ValueError(f"unknown optim.schedule {kind!r}; use constant, warmup_cosine or onecycle")


def onecycle_beta1(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """OneCycleLR's momentum cycling for Adam's beta1: max -> base during warm-up, base -> max after (cosine)."""
    up = max(int(float(cfg.pct_start) * total_steps), 1)
    hi, lo = float(cfg.max_momentum), float(cfg.base_momentum)
    return optax.join_schedules(
        [optax.cosine_decay_schedule(hi, up, alpha=lo / hi),
         lambda s: lo + (hi - lo) * (1 - jnp.cos(jnp.pi * jnp.minimum(s, total_steps - up) / max(total_steps - up, 1))) / 2],
        [up])


def _adamw(cfg, lr: optax.Schedule, total_steps: int) -> optax.GradientTransformation:
    b1 = onecycle_beta1(cfg, total_steps) if cfg.schedule == "onecycle" and cfg.get("cycle_momentum", False) \
        else float(cfg.b1)
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=float(cfg.b2), eps=float(cfg.eps), weight_decay=float(cfg.weight_decay))


def group_labels(params: nnx.State, groups: Sequence[tuple[str, str]]) -> nnx.State:
    """Labels every param leaf with the name of the first group whose regex matches its path."""
    compiled = [(name, re.compile(pattern)) for name, pattern in groups]

    def label(path, _):
        p = "/".join(str(getattr(k, "key", k)) for k in path)
        for name, rx in compiled:
            if rx.search(p):
                return name
        raise ValueError(f"param {p!r} matches no optimiser group; add a catch-all group '.*'")

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: ml_collections.ConfigDict, params: nnx.State, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Mapping[str, optax.Schedule]]:
    """AdamW with one transform per parameter group, global-norm clipping first.

    `cfg.groups` is a list of (name, regex, peak_lr). Returns the optimiser and each group's lr schedule
    (for logging).
    """
    groups = [(name, rx) for name, rx, _ in cfg.groups]
    schedules = {name: lr_schedule(cfg, float(peak), total_steps) for name, _, peak in cfg.groups}
    transforms = {name: _adamw(cfg, schedules[name], total_steps) for name in schedules}
    chain = []
    if cfg.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    chain.append(optax.multi_transform(transforms, group_labels(params, groups)))
    return optax.chain(*chain), schedules
