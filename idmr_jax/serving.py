"""Loader of an AdaFocal serving artifact (``python -m idmr_jax.convert export --format jax_serving``).

Imports only jax, numpy and the standard library (no flax, no other idmr_jax module), so this one file is also
the standalone loader: on a machine without idmr_jax, copy ``idmr_jax/serving.py`` into your project (e.g. as
``adafocal_serving.py``) and import it from there. The artifact itself holds data only and is never imported::

    from idmr_jax import serving            # or: import adafocal_serving as serving (the vendored copy)
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
``params``; bfloat16 stored as its uint16 bits; read with ``allow_pickle=False``) and ``serving.json``. Params are
an argument rather than constants baked into the programs because a ViT-g model (about 4 GB in float32) exceeds
the 2 GB limit of a serialized ``jax.export`` module, and because both functions then share one copy on the device.

Loading checks the artifact before using it and raises :class:`ServingArtifactError` naming the file or the
``serving.json`` field: every path in ``serving.json`` must name a file inside the artifact folder (after
resolving symlinks), each ``.jaxexport`` must deserialize and take the declared params, and ``params.npz`` must
hold exactly the declared arrays. Calling a function runs its StableHLO program on the device (as any
``jax.export`` artifact does, custom calls included), so load artifacts you trust.
Local paths only (copy a ``gs://`` artifact down first). ``jax.export`` deserialisation needs the
``flatbuffers`` package.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "idmr_jax.jax_serving"
FORMAT_VERSION = 1
METADATA_FILE = "serving.json"
FUNCTIONS = ("query", "target")  # the order `load` returns them in


class ServingArtifactError(ValueError):
    """An artifact this loader refuses: bad ``serving.json``, a path leaving the folder, a file that is not what
    ``serving.json`` declares."""


def read_metadata(directory) -> dict:
    """``serving.json`` of an artifact, checked for its format, version, paths and param declarations."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not a jax_serving artifact")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ServingArtifactError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ServingArtifactError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ServingArtifactError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                                   f"this loader reads {FORMAT!r} version {FORMAT_VERSION}")
    artifact_file(directory, "params_file", meta.get("params_file"))
    functions = meta.get("functions")
    if not isinstance(functions, dict) or any(not isinstance(functions.get(n), dict) for n in FUNCTIONS):
        raise ServingArtifactError(f"{path}: functions must map {list(FUNCTIONS)} to objects")
    for name in FUNCTIONS:
        artifact_file(directory, f"functions.{name}.file", functions[name].get("file"))
    params = meta.get("params")
    if not isinstance(params, list):
        raise ServingArtifactError(f"{path}: params must be a list, got {type(params).__name__}")
    for i, p in enumerate(params):
        _check_param_declaration(path, i, p)
    if len({p["key"] for p in params}) != len(params):
        raise ServingArtifactError(f"{path}: params declares an npz key twice")
    return meta


def _check_param_declaration(path: Path, i: int, p) -> None:
    """One ``params`` entry: {name, key: str, shape: [int >= 0], dtype: a numeric dtype name or bfloat16}."""
    where = f"{path}: params[{i}]"
    if not isinstance(p, dict) or not all(isinstance(p.get(k), str) for k in ("name", "key", "dtype")):
        raise ServingArtifactError(f"{where} = {p!r}: expected name, key and dtype strings")
    shape = p.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ServingArtifactError(f"{where}.shape = {shape!r}: expected a list of non-negative ints")
    if p["dtype"] != "bfloat16":
        try:
            kind = np.dtype(p["dtype"]).kind
        except TypeError:
            kind = None
        if kind not in ("b", "i", "u", "f", "c"):  # never object / string / structured data
            raise ServingArtifactError(f"{where}.dtype = {p['dtype']!r}: not a numeric dtype")


def artifact_file(directory, field: str, value) -> Path:
    """The file that ``serving.json``'s `field` names, refused unless it lies inside the artifact folder.

    `value` must be a relative path without ``..``; it is then resolved (symlinks followed) and must still be a
    file under the resolved folder, so a link pointing out of the folder is refused like ``../x``.
    """
    directory = Path(directory)
    where = f"{directory / METADATA_FILE}: {field} = {value!r}"
    if not isinstance(value, str) or not value:
        raise ServingArtifactError(f"{where}: expected a file name inside the artifact folder")
    # Both spellings: a Windows-style absolute path (C:\x, \\host\x) is not absolute to PurePosixPath.
    if (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()
            or PureWindowsPath(value).drive or value.startswith("\\")):
        raise ServingArtifactError(f"{where}: absolute paths are refused; paths are relative to the artifact folder")
    if ".." in PurePosixPath(value).parts or ".." in PureWindowsPath(value).parts:
        raise ServingArtifactError(f"{where}: '..' is refused; paths must stay inside the artifact folder")
    root = directory.resolve()
    try:
        resolved = (root / value).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise ServingArtifactError(f"{where}: cannot be resolved ({e})") from e
    if not resolved.is_relative_to(root):
        raise ServingArtifactError(f"{where}: resolves to {resolved}, outside the artifact folder {root}")
    if not resolved.is_file():
        raise ServingArtifactError(f"{where}: not a file in the artifact folder")
    return resolved


def load_params(directory, meta: dict | None = None) -> list[np.ndarray]:
    """The params of an artifact as host arrays, in the functions' argument order.

    The npz must hold exactly the arrays ``serving.json`` declares, with their shapes and dtypes; it is read with
    ``allow_pickle=False`` (an object array is refused, never unpickled).
    """
    directory = Path(directory)
    meta = meta or read_metadata(directory)
    path = artifact_file(directory, "params_file", meta["params_file"])
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ServingArtifactError(f"{path}: not a readable .npz of arrays ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ServingArtifactError(f"{path}: a single .npy array, expected an .npz archive of the params")
    with npz:
        declared = [p["key"] for p in meta["params"]]
        if sorted(npz.files) != sorted(declared):
            missing, extra = sorted(set(declared) - set(npz.files)), sorted(set(npz.files) - set(declared))
            raise ServingArtifactError(f"{path}: arrays do not match serving.json's params "
                                       f"(missing {missing[:5]}, undeclared {extra[:5]})")
        return [_read_param(npz, path, p) for p in meta["params"]]


def _read_param(npz, path: Path, p: dict) -> np.ndarray:
    try:
        a = npz[p["key"]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # object arrays: ValueError
        raise ServingArtifactError(f"{path}: array {p['key']} (param {p['name']}) is refused: {e}") from e
    if p["dtype"] == "bfloat16" and a.dtype == np.uint16:  # npz has no bfloat16: stored as the raw uint16 bits
        a = a.view(jnp.bfloat16)
    if list(a.shape) != p["shape"] or a.dtype.name != p["dtype"]:
        raise ServingArtifactError(f"{path}: param {p['name']} ({p['key']}) is {a.dtype.name}{list(a.shape)}, "
                                   f"serving.json says {p['dtype']}{p['shape']}")
    return a


def load_function(directory, name: str, meta: dict | None = None):
    """The ``jax.export.Exported`` of function `name`, checked to take the params ``serving.json`` declares.

    Any failure to deserialize (truncated file, random bytes, another format, a corrupted StableHLO program) is
    reported with the file's path.
    """
    directory = Path(directory)
    meta = meta or read_metadata(directory)
    path = artifact_file(directory, f"functions.{name}.file", meta["functions"][name]["file"])
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
        avals = exported.in_avals
        exported.mlir_module()  # parses the StableHLO bytes: a corrupted program is reported here, not at first call
    except Exception as e:  # flatbuffers reports garbage as struct.error, IndexError, AttributeError, ...
        cause = f"{type(e).__module__}.{type(e).__qualname__}".removeprefix("builtins.")
        raise ServingArtifactError(f"{path}: not a valid jax.export artifact ({cause}: {e})") from e
    params = meta["params"]
    if len(avals) < len(params):
        raise ServingArtifactError(f"{path}: takes {len(avals)} arguments, fewer than the {len(params)} params "
                                   "serving.json declares")
    for p, aval in zip(params, avals):
        if list(aval.shape) != p["shape"] or np.dtype(aval.dtype).name != p["dtype"]:
            raise ServingArtifactError(f"{path}: takes param {p['name']} as {np.dtype(aval.dtype).name}"
                                       f"{list(aval.shape)}, serving.json says {p['dtype']}{p['shape']}")
    return exported


def load(directory, *, device=None):
    """(query_fn, target_fn) of an artifact; params are put on `device` (default: JAX's default device) once.

    ``query_fn(pixels, input_ids, attention_mask, box, has_box) -> [b, E]``, ``target_fn(pixels) -> [b, Q, E]``
    (see the module docstring). Each function is jitted: the first call per input shape compiles. Everything is
    checked before anything is put on the device; a bad artifact raises :class:`ServingArtifactError`.
    """
    directory = Path(directory)
    meta = read_metadata(directory)
    exported = [load_function(directory, name, meta) for name in FUNCTIONS]
    params = jax.device_put(load_params(directory, meta), device)
    fns = []
    for exp in exported:
        call = jax.jit(exp.call)
        fns.append(lambda *args, _call=call: _call(params, *args))
    return tuple(fns)
