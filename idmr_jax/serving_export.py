"""Writes an AdaFocal serving artifact with ``jax.export``; :mod:`idmr_jax.serving` loads it without flax.

The query and target embedding functions of a trained model are exported with a symbolic batch size ``b``
(and a symbolic text length ``L``) for the requested platforms (default cpu, cuda and tpu: the artifact runs
wherever the loading machine's JAX does). Their first argument is the flat list of params, saved next to them
in ``params.npz``; see :mod:`idmr_jax.serving` for the inputs, outputs and the reason params are not baked in.
The artifact holds no Python: users load it with ``idmr_jax.serving.load`` or their vendored copy of that file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from idmr_jax import serving
from idmr_jax.data.boxes import box_to_patch_mask_batch
from idmr_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from idmr_jax.models import adafocal
from idmr_jax.models.vision import mask_patch_size

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's platform names


def _path_name(path) -> str:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)


def embedding_functions(model: adafocal.AdaFocal):
    """(param leaves, param names, query(params, pixels, ids, mask, box, has_box), target(params, pixels)).

    The functions rebuild the module from the given param leaves, so params are a traced argument.
    """
    cfg = model.cfg
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [_path_name(p) for p, _ in with_path]
    leaves = [v for _, v in with_path]
    grid = adafocal.grid(cfg)
    size = (cfg.image_size, cfg.image_size)
    patch = mask_patch_size(cfg.blip2.vision)

    def bind(param_leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, param_leaves), rest)

    def query(param_leaves, pixels, input_ids, attention_mask, box, has_box):
        m = bind(param_leaves)
        box_mask = box_to_patch_mask_batch(box, has_box, grid=grid, image_size=size, patch=patch)
        features, _ = m.query_features(m.encode_image(pixels), input_ids, attention_mask, box_mask)
        return features.astype(jnp.float32)  # the documented float32 outputs, whatever config.precision was

    def target(param_leaves, pixels):
        m = bind(param_leaves)
        return m.target_features(m.encode_image(pixels)).astype(jnp.float32)

    return leaves, names, query, target


def _spec(shape, dtype) -> tuple[list, str]:
    return [d if isinstance(d, int) else str(d) for d in shape], np.dtype(dtype).name


def _io_doc(name: str, shape, dtype, doc: str) -> dict:
    s, d = _spec(shape, dtype)
    return {"name": name, "shape": s, "dtype": d, "doc": doc}


def export(model: adafocal.AdaFocal, out, *, platforms: Sequence[str] | None = None,
           provenance: dict | None = None, max_text_len: int | None = None) -> epath.Path:
    """Writes ``out/{query,target}.jaxexport``, ``params.npz`` and ``serving.json`` (data only, no code).

    `max_text_len`: the text length used in training (documented in serving.json; L stays symbolic).
    """
    cfg = model.cfg
    platforms = tuple(platforms or DEFAULT_PLATFORMS)
    if unknown := sorted(set(platforms) - set(PLATFORMS)):
        raise ValueError(f"unknown platforms {unknown}; jax.export knows {list(PLATFORMS)}")
    out = epath.Path(out)
    if (out / serving.METADATA_FILE).exists():
        raise FileExistsError(f"{out / serving.METADATA_FILE} already exists; choose an empty output directory")
    out.mkdir(parents=True, exist_ok=True)
    leaves, names, query, target = embedding_functions(model)
    param_specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
    # L is bounded by the Q-Former's position table (the model checks it; the constraint lets it decide).
    b, length = jax.export.symbolic_shape(
        "b, L", constraints=[f"L <= {cfg.blip2.qformer.max_position_embeddings}", "L >= 1"])
    h = w = cfg.image_size
    q, e = cfg.blip2.num_query_tokens, cfg.blip2.embed_dim
    inputs = {
        "pixels": ((b, h, w, 3), jnp.float32, "RGB, TargetPad 1.25 + bicubic resize + centre crop, then "
                   "(x - CLIP mean) / CLIP std (see preprocessing)"),
        "input_ids": ((b, length), jnp.int32, "BERT uncased WordPiece ids, [CLS] first, right-padded with 0"),
        "attention_mask": ((b, length), jnp.int32, "1 = real token, 0 = padding"),
        "box": ((b, 4), jnp.float32, f"x1, y1, x2, y2 in pixels of the preprocessed {h}x{w} frame"),
        "has_box": ((b,), jnp.bool_, "False = no box (box ignored)"),
    }
    specs = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt, _) in inputs.items()}
    exported = {
        "query": jax.export.export(jax.jit(query), platforms=platforms)(param_specs, *specs.values()),
        # Its own symbolic scope: the text-length constraint would otherwise mention a variable it lacks.
        "target": jax.export.export(jax.jit(target), platforms=platforms)(
            param_specs, jax.ShapeDtypeStruct((jax.export.symbolic_shape("b")[0], h, w, 3), jnp.float32)),
    }
    for name, exp in exported.items():
        (out / f"{name}.jaxexport").write_bytes(bytes(exp.serialize()))

    params_meta, arrays = [], {}
    for i, (name, a) in enumerate(zip(names, leaves)):
        a = np.asarray(jax.device_get(a))
        key = f"p{i:04d}"
        dtype = a.dtype.name
        arrays[key] = a.view(np.uint16) if dtype == "bfloat16" else a
        params_meta.append({"name": name, "key": key, "shape": list(a.shape), "dtype": dtype})
    with (out / "params.npz").open("wb") as f:  # streamed: a ViT-g model is ~4 GB
        np.savez(f, **arrays)

    functions = {
        "query": {"file": "query.jaxexport", "call": "query_fn(pixels, input_ids, attention_mask, box, has_box)",
                  "inputs": [_io_doc(k, s, dt, doc) for k, (s, dt, doc) in inputs.items()],
                  "outputs": [_io_doc("query", (b, e), jnp.float32, "L2-normalised query embedding")]},
        "target": {"file": "target.jaxexport", "call": "target_fn(pixels)",
                   "inputs": [_io_doc("pixels", *inputs["pixels"])],
                   "outputs": [_io_doc("target", (b, q, e), jnp.float32,
                                       "L2-normalised target tokens; score = max over Q of query . target")]},
    }
    meta = {
        "format": serving.FORMAT, "format_version": serving.FORMAT_VERSION, "model": "adafocal",
        "platforms": list(platforms), "jax_version": jax.__version__,
        "image_size": h, "patch_grid": list(adafocal.grid(cfg)), "num_query_tokens": q, "embed_dim": e,
        "beta_mode": cfg.beta_mode, "max_text_len": max_text_len,
        "preprocessing": {"target_pad_ratio": 1.25, "resize": "bicubic, shorter side", "crop": "centre",
                          "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "tokenizer": "BERT uncased WordPiece"},
        "functions": functions, "params_file": "params.npz", "params": params_meta,
        "source": provenance or {},
    }
    (out / serving.METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    # Data only: no loader code is copied in, so nothing in the artifact is ever imported (see idmr_jax.serving).
    return out
