"""Optimiser recipes: optax AdamW with parameter groups, learning-rate and momentum schedules.

Groups are chosen by regexes over ``/``-joined param paths (first match wins), e.g. AdaFocal's paper recipe
trains CAAM at 1e-4 and everything else at 1e-5. The released recipe is one group with PyTorch's
``OneCycleLR`` (cosine annealing, ``div_factor=100``, ``final_div_factor=1e4``) including its default momentum
cycling, which for AdamW moves beta1 between 0.95 and 0.85 opposite to the learning rate.

The one-cycle schedules reproduce PyTorch step for step: its warm-up phase ends at step
``float(pct_start * total_steps) - 1`` and the annealing phase at ``total_steps - 1`` (optax's
``cosine_onecycle_schedule`` puts the boundaries one step later, so it is not used). The schedule value at optimiser
update ``k`` (0-based) is PyTorch's learning rate after ``k`` calls of ``scheduler.step()``.
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
    """Learning-rate schedule by name: constant, warmup_cosine, warmup_linear (transformers'
    ``get_linear_schedule_with_warmup``: 0 -> peak over the warm-up, then linearly to 0 at the last step, as the
    IDMR / VLM2Vec scripts train) or onecycle (PyTorch OneCycleLR semantics)."""
    kind = cfg.schedule
    warmup = int(cfg.get("warmup_steps", 0))
    if kind == "constant":
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup])
        return optax.constant_schedule(peak)
    if kind == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(total_steps, warmup + 1))
    if kind == "warmup_linear":
        decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
        if not warmup:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
    if kind == "onecycle":
        initial = peak / float(cfg.div_factor)
        return onecycle_schedule(initial, peak, initial / float(cfg.final_div_factor), total_steps,
                                 float(cfg.pct_start))
    raise ValueError(f"unknown optim.schedule {kind!r}; use constant, warmup_cosine, warmup_linear or "
                     "onecycle")


def _cos_anneal(start: float, end: float, step: jax.Array, begin: float, finish: float) -> jax.Array:
    """PyTorch's ``_annealing_cos`` from `start` (at `begin`) to `end` (at `finish`).

    ``end + (start - end) * (1 + cos(pi * p)) / 2`` is computed as ``start * sin(pi q / 2)^2 + end * sin(pi p / 2)^2``
    with ``q = 1 - p`` taken from the step difference itself: a sum of two non-negative terms, so float32 keeps
    ~1e-7 relative precision near both ends (the direct form cancels, e.g. ~1e-5 relative error on the first
    warm-up steps, and far worse near the final learning rate).
    """
    span = finish - begin
    if span <= 0:  # a phase of at most one step (PyTorch divides by zero here): it holds its start value
        return jnp.full(jnp.shape(step), start, jnp.float32)
    p = (step - begin) / span
    q = (finish - step) / span
    half = jnp.float32(jnp.pi / 2)
    return start * jnp.sin(half * q) ** 2 + end * jnp.sin(half * p) ** 2


def _two_phase(start: float, mid: float, end: float, total_steps: int, pct_start: float) -> optax.Schedule:
    """PyTorch ``OneCycleLR`` (two phases, cosine): start -> mid over steps [0, pct_start*T - 1], mid -> end over
    [pct_start*T - 1, T - 1]. Steps past T - 1 (PyTorch raises there) hold `end`."""
    warm_end = float(pct_start * total_steps) - 1  # exactly PyTorch's float arithmetic
    last = float(total_steps) - 1

    def schedule(count):
        s = jnp.minimum(jnp.asarray(count, jnp.float32), jnp.float32(max(last, 0.0)))
        up = _cos_anneal(start, mid, s, 0.0, warm_end)
        down = _cos_anneal(mid, end, s, warm_end, last)
        return jnp.where(s <= warm_end, up, down)

    return schedule


def onecycle_schedule(initial: float, peak: float, final: float, total_steps: int, pct_start: float
                      ) -> optax.Schedule:
    """PyTorch ``OneCycleLR`` learning rate (anneal_strategy="cos", three_phase=False): initial -> peak -> final."""
    return _two_phase(initial, peak, final, total_steps, pct_start)


def onecycle_beta1(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """OneCycleLR's momentum cycling for Adam's beta1 (``cycle_momentum=True``): max -> base during the warm-up,
    base -> max after it, on the learning rate's phase boundaries."""
    return _two_phase(float(cfg.max_momentum), float(cfg.base_momentum), float(cfg.max_momentum), total_steps,
                      float(cfg.pct_start))


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


def delayed(schedule: optax.Schedule, start: int) -> optax.Schedule:
    """`schedule` shifted to begin at step `start`, learning rate 0 before it (the group is not updated: AdamW's
    weight decay is scaled by the learning rate too)."""
    if start <= 0:
        return schedule
    return optax.join_schedules([optax.constant_schedule(0.0), schedule], [start])


def make_optimizer(cfg: ml_collections.ConfigDict, params: nnx.State, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Mapping[str, optax.Schedule]]:
    """AdamW with one transform per parameter group, global-norm clipping first.

    `cfg.groups` is a list of (name, regex, peak_lr); `cfg.group_start_steps` ({name: step}, optional) holds a
    group still until that step, its schedule then running over the remaining steps (see `delayed`). Returns the
    optimiser and each group's lr schedule (for logging).
    """
    groups = [(name, rx) for name, rx, _ in cfg.groups]
    starts = dict(cfg.get("group_start_steps") or {})
    if unknown := set(starts) - {name for name, _ in groups}:
        raise ValueError(f"optim.group_start_steps names {sorted(unknown)}, which are not optimiser groups "
                         f"({[name for name, _ in groups]})")
    schedules = {name: delayed(lr_schedule(cfg, float(peak), total_steps - int(starts.get(name, 0))),
                               int(starts.get(name, 0)))
                 for name, _, peak in cfg.groups}
    transforms = {name: _adamw(cfg, schedules[name], total_steps) for name in schedules}
    chain = []
    if cfg.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    chain.append(optax.multi_transform(transforms, group_labels(params, groups)))
    return optax.chain(*chain), schedules
