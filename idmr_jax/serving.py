"""Standalone loader of an AdaFocal serving artifact (``python -m idmr_jax.convert export --format jax_serving``).

Imports only jax, numpy and the standard library (no flax, no idmr_jax): the export also copies this file into
the artifact, so ``sys.path.insert(0, DIR); import serving`` works on a machine with nothing but jax::

    query_fn, target_fn = serving.load(DIR)
    query = query_fn(pixels, input_ids, attention_mask, box, has_box)   # [b, E] float32, L2-normalised
    target = target_fn(pixels)                                           # [b, Q, E] float32, L2-normalised
    scores = (query[:, None, None, :] * target[None]).sum(-1).max(-1)    # [b_query, b_target]: max over Q

Inputs (``b`` is symbolic: any batch size; ``H = W`` = the training image size, 224 for the paper model):

    pixels          [b, H, W, 3] float32  RGB, already preprocessed as in training: TargetPad 1.25, bicubic resize
                                          of the shorter side to H, centre crop, then (x - mean) / std with CLIP's
                                          mean (0.48145466, 0.4578275, 0.40821073), std (0.26862954, 0.26130258,
                                          0.27577711)
    input_ids       [b, L] int32          BERT uncased WordPiece ids of the modification text, [CLS] first,
                                          right-padded with 0 (L is symbolic; training used L = 32)
    attention_mask  [b, L] int32          1 for real tokens, 0 for padding
    box             [b, 4] float32        reference box x1, y1, x2, y2 in pixels of the preprocessed H x W frame
                                          (the original box through the same pad / resize / crop map, clipped)
    has_box         [b] bool              False: no box (the box values are ignored, beta has no effect)

Outputs: ``query`` [b, E] from ``query_fn`` and ``target`` [b, Q, E] from ``target_fn`` (E = 256, Q = 32 for the
paper model); the exact names, shapes and dtypes of one artifact are in ``DIR/serving.json``. The similarity
is the max over the Q target tokens of the dot product.

The artifact: ``query.jaxexport`` / ``target.jaxexport`` (``jax.export`` serialized functions whose first
argument is the list of params), ``params.npz`` (one array per param, in the order of ``serving.json``'s
``params``; bfloat16 stored as its uint16 bits) and ``serving.json``. Params are an argument rather than
constants baked into the programs because a ViT-g model (about 4 GB in float32) exceeds the 2 GB limit of a
serialized ``jax.export`` module, and because both functions then share one copy on the device.
Local paths only (copy a ``gs://`` artifact down first). ``jax.export`` deserialisation needs the
``flatbuffers`` package.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "idmr_jax.jax_serving"
FORMAT_VERSION = 1
METADATA_FILE = "serving.json"


def read_metadata(directory) -> dict:
    """``serving.json`` of an artifact, checked for its format and version."""
    path = Path(directory) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a jax_serving artifact")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"this loader reads {FORMAT!r} version {FORMAT_VERSION}")
    return meta


def load_params(directory, meta: dict | None = None) -> list[np.ndarray]:
    """The params of an artifact as host arrays, in the functions' argument order."""
    directory = Path(directory)
    meta = meta or read_metadata(directory)
    out = []
    with np.load(directory / meta["params_file"], allow_pickle=False) as npz:
        for p in meta["params"]:
            a = npz[p["key"]]
            if p["dtype"] == "bfloat16":  # npz has no bfloat16: stored as the raw uint16 bits
                a = a.view(jnp.bfloat16)
            if list(a.shape) != p["shape"] or a.dtype.name != p["dtype"]:
                raise ValueError(f"{directory / meta['params_file']}: param {p['name']} ({p['key']}) is "
                                 f"{a.dtype.name}{list(a.shape)}, serving.json says {p['dtype']}{p['shape']}")
            out.append(a)
    return out


def _deserialize(path: Path):
    return jax.export.deserialize(bytearray(path.read_bytes()))


def load(directory, *, device=None):
    """(query_fn, target_fn) of an artifact; params are put on `device` (default: JAX's default device) once.

    ``query_fn(pixels, input_ids, attention_mask, box, has_box) -> [b, E]``, ``target_fn(pixels) -> [b, Q, E]``
    (see the module docstring). Each function is jitted: the first call per input shape compiles.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    params = jax.device_put(load_params(directory, meta), device)
    fns = []
    for name in ("query", "target"):
        exported = _deserialize(directory / meta["functions"][name]["file"])
        call = jax.jit(exported.call)
        fns.append(lambda *args, _call=call: _call(params, *args))
    return tuple(fns)
