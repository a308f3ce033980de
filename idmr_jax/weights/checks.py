"""The checks every checkpoint import goes through, and the user-facing error they raise.

Tensor rule (one rule for every format of ``python -m idmr_jax.convert import`` and the tasks' pretrained init)
    Only float-to-float casts are allowed: a checkpoint tensor in float16 / bfloat16 / float64 is cast to the
    model's float dtype, and each (from, to) pair is logged once per import ("casting float16 -> float32 (12
    tensors)"). An integer or bool tensor where the model wants a float (or a float where it wants an integer)
    is an error naming the tensor. NaN or inf in a floating-point tensor is an error naming the tensor and the
    count, unless the caller allows non-finite values (``--allow-nonfinite``).

    Where it is enforced: :func:`idmr_jax.weights.torch_io.load_torch_state_dict` (every checkpoint read:
    non-finite values, and its optional float cast), ``NameMap.torch_to_flax`` (every checkpoint tensor mapped to
    a param, by its checkpoint name: the ports' params are all floating-point) and ``mapping.load_into`` (every
    cast into a module's variables).

Files
    :func:`read_json_file` reads a JSON file or says which file is not JSON; :func:`shard_path` keeps the shard
    names of a sharded checkpoint's index inside the checkpoint folder.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class ConvertError(Exception):
    """A user-facing conversion error (bad paths, unreadable or unsafe files, refused tensors); the CLI prints its
    one-line message and exits with code 2."""


def log(msg: str) -> None:
    """A progress / provenance note on stderr (stdout is reserved for verify's result lines)."""
    print(msg, file=sys.stderr, flush=True)


def is_float_dtype(dtype) -> bool:
    """True for floating-point dtypes, ``ml_dtypes.bfloat16`` included (numpy does not count it as floating)."""
    return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _dtype_name(dtype) -> str:
    return np.dtype(dtype).name


def require_float(name: str, value: Any, *, source: str) -> None:
    """Refuses checkpoint tensor `name` unless it is floating-point (the model wants a float param there)."""
    if not is_float_dtype(value.dtype):
        raise ConvertError(f"{source}: tensor {name!r} is {_dtype_name(value.dtype)}, the model wants a "
                           f"floating-point tensor (only float-to-float casts are allowed)")


def check_finite(state_dict: Mapping[str, Any], *, source: str, allow_nonfinite: bool = False) -> None:
    """Refuses NaN / inf in the floating-point tensors of `state_dict` unless `allow_nonfinite`."""
    if allow_nonfinite:
        return
    for name, value in state_dict.items():
        if is_float_dtype(value.dtype) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise ConvertError(f"{source}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf); pass "
                               f"--allow-nonfinite (allow_nonfinite=True) to import it anyway")


def cast_tensors(tensors: Mapping[str, Any], dtypes: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """`tensors` cast to ``dtypes[name]`` under the tensor rule: the same dtype stays as is (the same array), a float
    becomes another float (numpy; each pair logged once), anything else raises :class:`ConvertError` naming it."""
    out, casts = {}, Counter()
    for name, value in tensors.items():
        want = np.dtype(dtypes[name])
        if np.dtype(value.dtype) != want:
            if not (is_float_dtype(value.dtype) and is_float_dtype(want)):
                raise ConvertError(f"{source}: tensor {name!r} is {_dtype_name(value.dtype)}, the model wants "
                                   f"{_dtype_name(want)} (only float-to-float casts are allowed)")
            casts[_dtype_name(value.dtype), _dtype_name(want)] += 1
            value = np.asarray(value).astype(want)
        out[name] = value
    for (have, want), n in sorted(casts.items()):
        log(f"{source}: casting {have} -> {want} ({n} tensor{'s' if n > 1 else ''})")
    return out


def cast_floats_to(tensors: Mapping[str, Any], dtype: Any, *, source: str) -> dict[str, np.ndarray]:
    """`tensors` with every floating-point one cast to `dtype` (logged once per pair); others unchanged."""
    return cast_tensors(tensors, {k: dtype if is_float_dtype(v.dtype) else v.dtype for k, v in tensors.items()},
                        source=source)


def read_json_file(path: str | Path) -> Any:
    """The parsed JSON of `path`; a file that is not JSON raises :class:`ConvertError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a valid JSON file ({e})") from None


def shard_path(folder: Path, index_file: Path, entry: Any) -> Path:
    """The file of shard `entry` of a sharded checkpoint's `index_file`, which must stay inside `folder`: an
    absolute path, a ``..`` component or a symlink leading outside raises :class:`ConvertError`."""
    if not isinstance(entry, str) or not entry:
        raise ConvertError(f"{index_file}: shard entry {entry!r} is not a file name")
    path = Path(entry)
    root = folder.resolve()
    if path.is_absolute() or ".." in path.parts or not (folder / path).resolve().is_relative_to(root):
        raise ConvertError(f"{index_file}: shard entry {entry!r} points outside the checkpoint folder {folder}")
    return folder / path
