"""LoRA (low-rank adaptation) for :class:`idmr_jax.models.layers.Dense`, with PEFT's semantics.

A LoRA Dense computes ``y = x W + b + dropout(x) A B * scale`` with ``A`` (``lora_a``, shape
``in_features + (r,)``) initialised like PEFT (torch Linear's kaiming-uniform with a = sqrt(5), i.e.
U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and ``B`` (``lora_b``, shape ``(r,) + out_features``) zero, so a fresh
adapter leaves the model unchanged. ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
The base kernel keeps its ``param_dtype`` (e.g. bfloat16) while the LoRA factors are float32
(``LoRAConfig.param_dtype``); the LoRA branch runs in ``LoRAConfig.dtype`` (None: the layer's compute dtype).

Which layers get LoRA is decided by the model: :class:`idmr_jax.models.decoder_lm.DecoderLM` passes
``cfg.lora`` to the Dense layers whose short names (``q_proj``, ``down_proj``, ...) match
``LoRAConfig.targets`` (each target is a regex matched in full, so plain names match themselves).

Training freezes the base: :func:`frozen_patterns` gives the trainer's ``frozen_patterns`` (everything except
``lora_a`` / ``lora_b`` and any ``extra_trainable`` regexes). Dropout inside the LoRA branch uses the
``dropout`` RNG stream; reseed stacked (scanned) layers with ``nnx.reseed(model, dropout=key,
policy="match_shape")``.

:func:`merge` folds the adapters into the base kernels (PEFT's ``merge_adapter``), :func:`unmerge` takes them
out again; both work in place on a module or functionally on flat param dicts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LORA_PARAMS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters (PEFT ``LoraConfig`` names in brackets).

    rank [r], alpha [lora_alpha], dropout [lora_dropout] on the LoRA branch input, targets [target_modules]:
    regexes matched in full against layer short names, use_rslora: scale alpha/sqrt(r) instead of alpha/r,
    param_dtype: dtype of the LoRA factors (float32 even when the frozen base is bfloat16), dtype: compute dtype of
    the LoRA branch (None: the layer's; set from ``config.precision``'s ``lora`` part).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    use_rslora: bool = False
    param_dtype: str = "float32"
    dtype: str | None = None

    def __post_init__(self):
        if int(self.rank) < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str):
            raise TypeError("LoRAConfig.targets must be a tuple of names/regexes, not a single string")
        object.__setattr__(self, "targets", tuple(self.targets))
        for t in self.targets:
            re.compile(t)

    @property
    def scale(self) -> float:
        """The factor on ``x A B``: alpha / r (PEFT default) or alpha / sqrt(r) (rsLoRA)."""
        return float(self.alpha) / (math.sqrt(self.rank) if self.use_rslora else float(self.rank))

    def applies_to(self, name: str) -> bool:
        """Whether a layer with short name `name` (e.g. "q_proj") gets LoRA."""
        return any(re.fullmatch(t, name) for t in self.targets)


def maybe(lora: LoRAConfig | None, name: str) -> LoRAConfig | None:
    """`lora` if it targets the layer `name`, else None (what a model passes to ``Dense(lora=...)``)."""
    return lora if lora is not None and lora.applies_to(name) else None


# ----------------------------------------------------------------------------------------------
# Trainable / frozen split.


def frozen_patterns(extra_trainable: Sequence[str] = ()) -> tuple[str, ...]:
    """Regexes for the trainer's ``frozen_patterns`` (``idmr_jax.train.state.frozen_filter``, searched in the
    ``/``-joined param path) that freeze every param except ``lora_a`` / ``lora_b`` and those matching a regex
    of `extra_trainable` (e.g. ``r"^projector/"``)."""
    keep = [r"(?:^|.*/)lora_[ab]$"] + [f".*?(?:{p})" for p in extra_trainable]
    for p in extra_trainable:
        re.compile(p)
    return ("^" + "".join(f"(?!{k})" for k in keep),)


def is_lora_path(path: str) -> bool:
    """Whether a flat param path (``a/b/lora_a``) is a LoRA factor."""
    return path.rsplit("/", 1)[-1] in LORA_PARAMS


def lora_filter(path: tuple, _value: Any) -> bool:
    """nnx filter: true for LoRA factor params (use ``nnx.Not(lora_filter)`` for the base weights)."""
    return bool(path) and str(getattr(path[-1], "key", path[-1])) in LORA_PARAMS


def split_flat(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base params, LoRA params) of a flat param dict."""
    base = {k: v for k, v in flat.items() if not is_lora_path(k)}
    lora = {k: v for k, v in flat.items() if is_lora_path(k)}
    return base, lora


# ----------------------------------------------------------------------------------------------
# Merge / unmerge.


def delta(lora_a: Any, lora_b: Any, scale: float) -> np.ndarray:
    """The kernel update ``A B * scale`` in float32, shaped ``in_features + out_features``."""
    a = np.asarray(lora_a, np.float32)
    b = np.asarray(lora_b, np.float32)
    r = a.shape[-1]
    if b.shape[0] != r:
        raise ValueError(f"lora_a {a.shape} and lora_b {b.shape} disagree on the rank")
    d = a.reshape(-1, r) @ b.reshape(r, -1) * np.float32(scale)
    return d.reshape(a.shape[:-1] + b.shape[1:])


def _apply_flat(flat: Mapping[str, Any], lora_flat: Mapping[str, Any], scale: float, sign: float) -> dict:
    out = {k: v for k, v in flat.items() if not is_lora_path(k)}
    prefixes = sorted({k.rsplit("/", 1)[0] for k in lora_flat if is_lora_path(k)})
    for p in prefixes:
        a, b, kernel = f"{p}/lora_a", f"{p}/lora_b", f"{p}/kernel"
        if a not in lora_flat or b not in lora_flat:
            raise ValueError(f"LoRA layer {p!r} needs both lora_a and lora_b")
        if kernel not in out:
            raise ValueError(f"LoRA layer {p!r} has no base kernel {kernel!r}")
        k = np.asarray(out[kernel])
        la, lb = np.asarray(lora_flat[a]), np.asarray(lora_flat[b])
        # a: in + (r,), b: (r,) + out, kernel: in + out; stacked (scanned) layers add a leading axis to all three.
        stacked = la.ndim + lb.ndim - 3 == k.ndim
        d = np.stack([delta(x, y, scale) for x, y in zip(la, lb)]) if stacked else delta(la, lb, scale)
        if d.shape != k.shape:
            raise ValueError(f"LoRA delta of {p!r} has shape {d.shape}, the kernel {k.shape}")
        out[kernel] = (k.astype(np.float32) + sign * d).astype(k.dtype)
    return out


def merge(model_or_flat: Any, lora: LoRAConfig | None = None) -> Any:
    """Folds LoRA into the base kernels.

    * an ``nnx.Module``: in place on every LoRA Dense (its LoRA branch is then skipped, as PEFT's merged
      layers); returns the module. Calling it twice raises.
    * a flat param dict (``flatten_params``) or an ``nnx.State`` of params: returns a new flat dict of base
      params only (LoRA factors folded in and dropped: loadable into the same model with ``lora=None``);
      `lora` gives the scale.
    Kernels keep their dtype, so bfloat16 kernels round the merged sum.
    """
    if isinstance(model_or_flat, nnx.Module):
        for dense in _lora_denses(model_or_flat):
            if dense.lora_merged:
                raise ValueError("merge: this model's LoRA is already merged")
            _update_kernel(dense, +1.0)
            dense.lora_merged = True
        return model_or_flat
    if lora is None:
        raise ValueError("merge of flat params needs the LoRAConfig (for its scale)")
    flat = _flat(model_or_flat)
    return _apply_flat(flat, flat, lora.scale, +1.0)


def unmerge(model_or_flat: Any, lora_flat: Mapping[str, Any] | None = None, lora: LoRAConfig | None = None) -> Any:
    """Inverse of :func:`merge`: subtracts ``A B * scale`` from the kernels.

    A module (merged in place by :func:`merge`) is restored in place and its LoRA branches are active again.
    Flat merged params need the LoRA factors (`lora_flat`) and `lora`; returns base params + the factors.
    Exact up to float rounding of the kernel dtype.
    """
    if isinstance(model_or_flat, nnx.Module):
        for dense in _lora_denses(model_or_flat):
            if not dense.lora_merged:
                raise ValueError("unmerge: this model's LoRA is not merged")
            _update_kernel(dense, -1.0)
            dense.lora_merged = False
        return model_or_flat
    if lora_flat is None or lora is None:
        raise ValueError("unmerge of flat params needs the LoRA factors and the LoRAConfig")
    lora_flat = _flat(lora_flat)
    base = _apply_flat(_flat(model_or_flat), lora_flat, lora.scale, -1.0)
    return {**base, **{k: v for k, v in lora_flat.items() if is_lora_path(k)}}


def _flat(params: Any) -> dict[str, Any]:
    from idmr_jax.weights.mapping import flatten_params

    return flatten_params(params) if isinstance(params, nnx.State | nnx.Module) else dict(params)


def _lora_denses(model: nnx.Module) -> list:
    from idmr_jax.models.layers import Dense

    out = [m for _, m in nnx.iter_graph(model) if isinstance(m, Dense) and m.lora is not None]
    if not out:
        raise ValueError("the model has no LoRA layers")
    return out


def _update_kernel(dense, sign: float) -> None:
    k = dense.kernel[...]
    a, b = dense.lora_a[...], dense.lora_b[...]
    scale = dense.lora.scale
    if a.ndim == len(dense.in_features) + 1:
        d = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1) * scale
    else:  # stacked (scanned / vmapped) layers: leading layer axis
        d = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    dense.kernel[...] = (k.astype(jnp.float32) + sign * d).astype(k.dtype)
