"""idmr_jax's own saved-model format: converted Flax models as ``model_config.json`` + Orbax ``params/``.

Flax side (a converted model)
    :func:`save_model` writes a directory::

        DIR/
          model_config.json   {"format_version": 1, "kind": "blip2" | "vit" | "qformer" | "adafocal",
                               "config": {dataclass fields, nested dataclasses as objects}, ...}
          params/             Orbax StandardCheckpointer of the module's pure nnx.Param dict
                              (layer indices as string keys, in the module's own layout: stacked if scanned)

    :func:`restore_model` rebuilds the module from ``model_config.json`` alone (no original checkpoint needed),
    optionally with config overrides (compute dtype, remat, even ``scan``: layouts are re-stacked / unstacked)
    and a mesh to restore straight into sharded arrays. :func:`restore_params` returns the flat params without
    building a module (what export needs).

PyTorch checkpoint files are read and written by :mod:`idmr_jax.weights.torch_io`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from idmr_jax.weights.mapping import flatten_params, stack_for_model, unflatten_params
from idmr_jax.weights.checks import is_float_dtype

PathLike = str | os.PathLike

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Model configs <-> JSON.

# kind -> (module, config class, model class). Imported lazily: the model files are independent modules.
MODEL_KINDS: dict[str, tuple[str, str, str]] = {
    "blip2": ("idmr_jax.models.blip2", "Blip2Config", "Blip2"),
    "vit": ("idmr_jax.models.vit", "ViTConfig", "VisionTransformer"),
    "qformer": ("idmr_jax.models.qformer", "QFormerConfig", "QFormer"),
    "adafocal": ("idmr_jax.models.adafocal", "AdaFocalConfig", "AdaFocal"),
    "llava": ("idmr_jax.models.llava", "LlavaConfig", "LlavaEmbedder"),
    "internvl": ("idmr_jax.models.internvl", "InternVLConfig", "InternVLEmbedder"),
    "qwen2vl": ("idmr_jax.models.qwen2vl", "Qwen2VLConfig", "Qwen2VLEmbedder"),
    "decoder_lm": ("idmr_jax.models.decoder_lm", "DecoderLMConfig", "DecoderLM"),
}


def model_classes(kind: str) -> tuple[type, type]:
    """(config dataclass, nnx.Module class) for a model kind."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    mod, cfg_name, cls_name = MODEL_KINDS[kind]
    m = importlib.import_module(mod)
    return getattr(m, cfg_name), getattr(m, cls_name)


def kind_of(config) -> str:
    """The model kind whose config class `config` is an instance of."""
    for kind in MODEL_KINDS:
        try:
            cfg_cls, _ = model_classes(kind)
        except (ImportError, AttributeError):
            continue
        if isinstance(config, cfg_cls):
            return kind
    raise ValueError(f"{type(config).__name__} is not the config of a known model kind {sorted(MODEL_KINDS)}")


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:  # e.g. jnp.bfloat16 (a scalar type object)
        return np.dtype(value).name
    except TypeError:
        raise TypeError(f"cannot write config value {value!r} ({type(value).__name__}) to JSON") from None


def config_to_dict(config) -> dict:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a config dataclass, got {type(config).__name__}")
    return _jsonable(config)


def _from_json(tp, value):
    """Rebuilds `value` as type `tp`: nested dataclasses, and tuples (frozen configs must stay hashable)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return config_from_dict(tp, value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        classes = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if classes and isinstance(value, Mapping):
            # e.g. VisionConfig = ViTConfig | EfficientNetEncoderConfig: the class whose fields hold every key.
            for arg in classes:
                if set(value) <= {f.name for f in dataclasses.fields(arg) if f.init}:
                    return config_from_dict(arg, value)
            return config_from_dict(classes[0], value)  # raises, naming the unknown fields
        return _from_json(Any, value)
    if isinstance(value, list):
        args = typing.get_args(tp)
        if origin is list:
            return [_from_json(args[0] if args else Any, v) for v in value]
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else Any
        if args and not (len(args) == 2 and args[1] is Ellipsis) and len(args) == len(value):
            return tuple(_from_json(a, v) for a, v in zip(args, value))
        return tuple(_from_json(inner, v) for v in value)
    return value


def config_from_dict(cls: type, data: Mapping):
    """Inverse of :func:`config_to_dict`; unknown keys are an error (the file is from another version)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**{k: _from_json(hints.get(k, Any), v) for k, v in data.items()})


def load_model_config(directory: PathLike) -> tuple[str, Any]:
    """(kind, config dataclass) from ``DIR/model_config.json``."""
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a converted idmr_jax checkpoint")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    cfg_cls, _ = model_classes(meta["kind"])
    return meta["kind"], config_from_dict(cfg_cls, meta["config"])


def build_model(config, *, kind: str | None = None, seed: int = 0) -> nnx.Module:
    """A freshly initialised module for `config` (kind inferred from the config class if not given)."""
    _, model_cls = model_classes(kind or kind_of(config))
    return model_cls(config, rngs=nnx.Rngs(seed))


# ----------------------------------------------------------------------------------------------
# Orbax checkpoints of converted models.


def _nested_str_keys(flat: Mapping[str, Any]) -> dict:
    # String keys only: Orbax would otherwise restore integer layer keys as strings without a target anyway.
    root: dict = {}
    for path, value in flat.items():
        node = root
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return root


def save_model(directory: PathLike, module_or_params, config, *, kind: str | None = None,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Writes a converted model: ``DIR/model_config.json`` + ``DIR/params`` (Orbax).

    Args:
      directory: created if needed; must not already hold ``params``.
      module_or_params: an nnx.Module, an nnx.State, or a flat ``{"a/b": array}`` / nested dict of params.
      config: the module's config dataclass (written field by field).
      kind: "blip2" | "vit" | "qformer" | "adafocal"; inferred from the config class if not given.
      extra: JSON-able provenance stored next to the config (e.g. source path and format).
    """
    directory = Path(directory).absolute()
    kind = kind or kind_of(config)
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    flat = flatten_params(module_or_params) if not _is_flat(module_or_params) else dict(module_or_params)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / PARAMS_DIR).exists():
        raise FileExistsError(f"{directory / PARAMS_DIR} already exists; choose an empty output directory")
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    # Arrays are saved as they are (jax arrays keep their sharding; Orbax writes each shard from its host).
    ckptr.save(directory / PARAMS_DIR, _nested_str_keys(flat))
    ckptr.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "config": config_to_dict(config),
            "num_params": int(sum(int(np.prod(v.shape)) for v in flat.values()))}
    if extra:
        meta["source"] = dict(extra)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _is_flat(x) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, nnx.State) and all(
        isinstance(k, str) and not isinstance(v, Mapping) for k, v in x.items())


def saved_param_shapes(directory: PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{flat path: (shape, dtype)}`` of a saved checkpoint, from Orbax metadata (no tensor is read)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(Path(directory).absolute() / PARAMS_DIR)
    item = getattr(meta, "item_metadata", meta)
    tree = getattr(item, "tree", item)
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten_params(dict(tree)).items()}


def _restore_flat(directory: Path, target: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    restored = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, _nested_str_keys(target))
    return flatten_params(restored)


def restore_params(directory: PathLike, *, dtype: Any = None) -> tuple[str, Any, dict[str, np.ndarray]]:
    """(kind, config, flat numpy params) of a saved model, without building the module (what export uses).

    `dtype` casts floating-point params on restore; None keeps the saved dtypes.
    """
    directory = Path(directory).absolute()
    kind, config = load_model_config(directory)
    device = jax.local_devices()[0]
    target = {k: jax.ShapeDtypeStruct(shape, dtype if dtype is not None and is_float_dtype(dt) else dt,
                                      sharding=jax.sharding.SingleDeviceSharding(device))
              for k, (shape, dt) in saved_param_shapes(directory).items()}
    flat = _restore_flat(directory, target)
    return kind, config, {k: np.asarray(v) for k, v in flat.items()}


def _unstack_generic(saved: Mapping[str, Any], model_flat: Mapping[str, Any]) -> dict[str, Any]:
    """Splits stacked (scanned) saved params into the per-layer paths `model_flat` wants."""
    out = dict(saved)
    for path in list(saved):
        if path in model_flat:
            continue
        parts = path.split("/")
        for k in range(len(parts)):
            if "/".join(parts[:k] + ["0"] + parts[k:]) in model_flat:
                value = out.pop(path)
                for i in range(value.shape[0]):
                    out["/".join(parts[:k] + [str(i)] + parts[k:])] = value[i]
                break
    return out


def _divisible(sharding, shape):
    """`sharding` with every mesh axis dropped from array dims it does not divide evenly.

    Orbax reads one equal slice per device; an odd vocabulary (BLIP-2's 30523) cannot be cut that way, so that
    dimension is replicated instead.
    """
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
    fixed = []
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        fixed.append(axes if dim % int(np.prod([sizes[a] for a in names] or [1])) == 0 else None)
    if fixed == spec:
        return sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*fixed))


def restore_model(directory: PathLike, *, overrides: Mapping[str, Any] | None = None, mesh=None, rules=None,
                  seed: int = 0) -> tuple[nnx.Module, Any]:
    """Rebuilds a saved model from ``DIR/model_config.json`` and restores its params.

    Args:
      directory: written by :func:`save_model` (e.g. by ``python -m idmr_jax.convert import``).
      overrides: config fields to replace before building (``dtype``, ``remat``, ``scan``, ...). Fields that
        change the param layout are handled for scanned layers (stacked <-> per-layer); any other change of
        names or shapes is a :class:`WeightMismatchError`. Param dtypes follow the rebuilt module.
      mesh, rules: restore straight into the sharded layout given by the params' logical axis names
        (``idmr_jax.sharding``); without them arrays land on the default device.
      seed: seeds the module's non-param state (dropout RNG streams); params all come from the checkpoint.

    Returns:
      (module, config), config with the overrides applied.
    """
    from idmr_jax import sharding as shd

    directory = Path(directory).absolute()
    kind, config = load_model_config(directory)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    _, model_cls = model_classes(kind)

    def build():
        return model_cls(config, rngs=nnx.Rngs(seed))

    abstract = nnx.eval_shape(build)
    abstract_params = nnx.state(abstract, nnx.Param)
    model_abstract = flatten_params(abstract_params)
    if mesh is not None:
        shardings = flatten_params(shd.state_shardings(abstract_params, mesh, rules or shd.DEFAULT_RULES))
        shardings = {k: _divisible(s, model_abstract[k].shape) for k, s in shardings.items()}
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {k: dev for k in model_abstract}
    saved = saved_param_shapes(directory)
    same_layout = set(saved) == set(model_abstract) and all(
        saved[k][0] == tuple(model_abstract[k].shape) for k in saved)
    if same_layout:
        # Orbax reads each shard where it belongs and casts to the module's param dtype on the way.
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in model_abstract.items()}
        flat = _restore_flat(directory, target)
    else:
        _, _, saved_flat = restore_params(directory)
        arranged = stack_for_model(_unstack_generic(saved_flat, model_abstract), model_abstract,
                                   source=str(directory))
        flat = {k: jax.device_put(np.asarray(v).astype(model_abstract[k].dtype), shardings[k])
                for k, v in arranged.items()}

    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        # Non-param state (dropout RNG streams) is small: materialise only it. Under jit, XLA drops the param
        # initialisers whose results are not returned, so no full-size random init happens.
        rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
    nnx.replace_by_pure_dict(params, unflatten_params(flat))
    return nnx.merge(graphdef, params, rest), config
