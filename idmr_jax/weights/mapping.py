"""One declarative name map, used in both directions, between PyTorch state dicts and Flax params.

A :class:`NameMap` is a list of :class:`Rule` (torch name, flax path, per-tensor transform). Conversions are
strict: a tensor missing on either side, left over, or of the wrong shape raises :class:`WeightMismatchError`
naming it. Flax paths are ``/``-joined keys of the module's pure param dict; layers are written unstacked
(``encoder/layers/3/...``), and :func:`stack_for_model` / :func:`unstack_from_model` translate to the
stacked layout of scanned layers (``encoder/layers/...`` with a leading layer axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from idmr_jax.weights.checks import cast_tensors, require_float

Array = np.ndarray


class WeightMismatchError(ValueError):
    """A checkpoint and a model disagree on the names or shapes of their tensors."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """A per-tensor transform with its inverse. `name` appears in error messages."""

    name: str
    to_flax: Callable[[Array], Array]
    to_torch: Callable[[Array], Array]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch Linear stores [out, in]; Flax kernels are [in, out].
LINEAR = Transform("linear", lambda x: np.ascontiguousarray(x.T), lambda x: np.ascontiguousarray(x.T))
# torch Conv2d stores [out, in, kh, kw]; Flax Conv kernels are [kh, kw, in, out].
CONV2D = Transform(
    "conv2d",
    lambda x: np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
    lambda x: np.ascontiguousarray(x.transpose(3, 2, 0, 1)),
)


def reshape(torch_shape: Sequence[int], flax_shape: Sequence[int]) -> Transform:
    """Reshape between fixed shapes (e.g. a [1, N, D] torch parameter stored as [N, D])."""
    return Transform(
        f"reshape{tuple(torch_shape)}->{tuple(flax_shape)}",
        lambda x: x.reshape(flax_shape),
        lambda x: x.reshape(torch_shape),
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    flax: str
    transform: Transform = IDENTITY


def per_layer(rules: Iterable[Rule], layers: Iterable[int]) -> list[Rule]:
    """Expands ``{i}`` in both names of every rule for each layer index."""
    rules = list(rules)
    return [
        Rule(r.torch.format(i=i), r.flax.format(i=i), r.transform) for i in layers for r in rules
    ]


def prefixed(rules: Iterable[Rule], torch_prefix: str = "", flax_prefix: str = "") -> list[Rule]:
    """Adds prefixes to every rule (e.g. to nest a vision tower map inside a BLIP-2 map)."""
    return [Rule(torch_prefix + r.torch, flax_prefix + r.flax, r.transform) for r in rules]


class NameMap:
    """An ordered, duplicate-free list of rules between torch names and flax paths."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = list(rules)
        for side in ("torch", "flax"):
            names = [getattr(r, side) for r in self.rules]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"name map lists {side} names twice: {dupes[:5]}")

    def __len__(self) -> int:
        return len(self.rules)

    def torch_to_flax(self, state_dict: Mapping[str, Array], *, source: str = "checkpoint",
                      ignore: Sequence[str] = ()) -> dict[str, Array]:
        """Converts a torch state dict to flat flax params. Every tensor must be used exactly once.

        `ignore` holds regexes of torch names that may be present and are dropped on purpose (e.g. buffers).
        Every mapped tensor must be floating-point (the ports' params all are; see :mod:`~idmr_jax.weights.checks`).
        """
        ignored = [re.compile(p) for p in ignore]
        missing = [r.torch for r in self.rules if r.torch not in state_dict]
        if missing:
            raise WeightMismatchError(
                f"{source}: {len(missing)} tensor(s) the model needs are missing, e.g. {missing[:8]}")
        known = {r.torch for r in self.rules}
        leftover = [k for k in state_dict if k not in known and not any(p.fullmatch(k) for p in ignored)]
        if leftover:
            raise WeightMismatchError(
                f"{source}: {len(leftover)} unexpected tensor(s) the model does not use, e.g. {sorted(leftover)[:8]}")
        out = {}
        for r in self.rules:
            value = np.asarray(state_dict[r.torch])
            require_float(r.torch, value, source=source)
            try:
                out[r.flax] = np.asarray(r.transform.to_flax(value))
            except ValueError as e:
                raise WeightMismatchError(f"{source}: tensor {r.torch!r} ({r.transform.name}): {e}") from e
        return out

    def flax_to_torch(self, flat: Mapping[str, Array], *, source: str = "flax params") -> dict[str, Array]:
        """Converts flat flax params to a torch-named state dict; strict in both directions."""
        missing = [r.flax for r in self.rules if r.flax not in flat]
        if missing:
            raise WeightMismatchError(f"{source}: {len(missing)} param(s) missing, e.g. {missing[:8]}")
        known = {r.flax for r in self.rules}
        leftover = sorted(k for k in flat if k not in known)
        if leftover:
            raise WeightMismatchError(
                f"{source}: {len(leftover)} param(s) have no torch name, e.g. {leftover[:8]}")
        return {r.torch: np.asarray(r.transform.to_torch(np.asarray(flat[r.flax]))) for r in self.rules}


# ----------------------------------------------------------------------------------------------
# Flat views of NNX modules.


def _path_str(path: Sequence) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def flatten_params(tree) -> dict[str, Array]:
    """Flat ``{"a/b/c": array}`` view of a module, an ``nnx.State`` or a nested pure dict."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, prefix + (k,))
        else:
            out[_path_str(prefix)] = node

    walk(tree, ())
    return out


def unflatten_params(flat: Mapping[str, Array]) -> dict:
    """Inverse of :func:`flatten_params` for pure dicts (integer-looking keys become ints, as in NNX)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root


def stacked_layer_keys(model_path: str, flat: Mapping[str, Array]) -> list[str] | None:
    """The per-layer keys of `flat` (``a/0/b``, ``a/1/b``, ...) whose stack forms the scanned param `model_path`
    (``a/b``), or None if `flat` has no layer 0 for it."""
    parts = model_path.split("/")
    for k in range(len(parts)):
        first = "/".join(parts[:k] + ["0"] + parts[k:])
        if first in flat:
            keys = []
            i = 0
            while (key := "/".join(parts[:k] + [str(i)] + parts[k:])) in flat:
                keys.append(key)
                i += 1
            return keys
    return None


def stack_for_model(flat: Mapping[str, Array], model_flat: Mapping[str, Array], *,
                    source: str = "checkpoint") -> dict[str, Array]:
    """Arranges unstacked converted params into the model's layout and checks every name and shape."""
    out, used = {}, set()
    for path, ref in model_flat.items():
        if path in flat:
            out[path], keys = flat[path], [path]
        elif (keys := stacked_layer_keys(path, flat)) is not None:
            out[path] = np.stack([flat[k] for k in keys])
        else:
            raise WeightMismatchError(f"{source}: model param {path!r} has no tensor in the checkpoint")
        used.update(keys)
        if tuple(out[path].shape) != tuple(ref.shape):
            raise WeightMismatchError(
                f"{source}: param {path!r} has shape {tuple(out[path].shape)}, the model expects {tuple(ref.shape)}")
    leftover = sorted(set(flat) - used)
    if leftover:
        raise WeightMismatchError(f"{source}: {len(leftover)} converted tensor(s) unused by the model, e.g. {leftover[:8]}")
    return out


def unstack_from_model(model_flat: Mapping[str, Array], name_map: NameMap) -> dict[str, Array]:
    """Inverse of :func:`stack_for_model`: splits scanned params into the per-layer paths of `name_map`."""
    wanted = {r.flax for r in name_map.rules}
    out = {}
    for path, value in model_flat.items():
        if path in wanted:
            out[path] = np.asarray(value)
            continue
        parts = path.split("/")
        for k in range(len(parts)):
            if "/".join(parts[:k] + ["0"] + parts[k:]) in wanted:
                for i in range(value.shape[0]):
                    out["/".join(parts[:k] + [str(i)] + parts[k:])] = np.asarray(value[i])
                break
        else:
            out[path] = np.asarray(value)  # left for flax_to_torch to report
    return out


def load_into(module: nnx.Module, flat: Mapping[str, Array], *, source: str = "checkpoint",
              variables: Any = nnx.Param) -> None:
    """Strictly writes converted flat tensors into `module`, cast to each variable's dtype under the tensor rule
    of :mod:`~idmr_jax.weights.checks` (float-to-float only, each dtype pair logged once).

    `variables` is an nnx filter of what the checkpoint holds (e.g. ``nnx.Any(nnx.Param, nnx.BatchStat)`` for
    BatchNorm statistics). Values become device arrays, so jitted calls do not re-transfer host weights.
    """
    state = nnx.state(module, variables)
    model_flat = flatten_params(state)
    arranged = stack_for_model(flat, model_flat, source=source)
    cast = cast_tensors(arranged, {k: model_flat[k].dtype for k in arranged}, source=source)
    cast = {k: jnp.asarray(v) for k, v in cast.items()}
    nnx.replace_by_pure_dict(state, unflatten_params(cast))
    nnx.update(module, state)


def load_partial(module: nnx.Module, converted: Mapping[str, Array], *, source: str = "checkpoint") -> list[str]:
    """Strictly loads `converted` flat params into `module`; params it does not cover keep their current values.

    Every converted path must exist in the module with the right shape (:func:`load_into` checks). Returns the
    (per-layer) paths left untouched, so callers can log or assert them (e.g. fresh cross-attention layers).
    """
    identity = NameMap([Rule(k, k) for k in converted])
    current = unstack_from_model(flatten_params(module), identity)
    left = sorted(k for k in current if k not in converted)
    load_into(module, {**current, **converted}, source=source)
    return left
