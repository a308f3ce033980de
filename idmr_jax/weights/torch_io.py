"""PyTorch-side checkpoint files: state dicts in and out (transformers folders, safetensors, torch pickles).

PyTorch side
    :func:`load_torch_state_dict` reads a transformers folder (``model.safetensors``, a sharded
    ``model.safetensors.index.json``, or the legacy ``pytorch_model.bin[.index.json]``), a single ``.safetensors``
    file, or a ``.bin`` / ``.pt`` / ``.pth`` state dict. ``.bin``-style files go through
    ``torch.load(map_location="cpu", weights_only=True)``: nothing else is ever unpickled. The result is a
    ``dict[name, numpy array]`` in the stored dtype; bfloat16 stays bfloat16 (as ``ml_dtypes.bfloat16``, which
    numpy and JAX both understand) unless ``float_dtype`` asks for an explicit cast. Keeping the stored dtype
    is what makes import -> export bit-exact. Every read goes through :mod:`idmr_jax.weights.checks`: NaN / inf
    are refused unless allowed, a cast is float-to-float and logged, shard names stay inside the folder, and
    an unreadable, truncated or unsafe file raises ``ConvertError`` naming it.
    :func:`save_torch_state_dict` writes ``model.safetensors`` (metadata ``format=pt``, as transformers expects)
    and optionally ``config.json``.
    :func:`cast_floats` casts the floating-point tensors of a state dict (export ``--dtype``).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from idmr_jax.weights.checks import (ConvertError, cast_floats_to, check_finite, is_float_dtype, read_json_file,
                                     shard_path)
from idmr_jax.weights.mapping import WeightMismatchError

PathLike = str | os.PathLike

# ----------------------------------------------------------------------------------------------
# PyTorch state dicts.

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    # safetensors' numpy backend maps BF16 to ml_dtypes.bfloat16, so no torch is needed and nothing is upcast.
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except SafetensorError as e:  # truncated or corrupt: say which file, without the Rust error's traceback
        raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None


def _torch_to_numpy(name: str, t) -> np.ndarray:
    import torch

    if not isinstance(t, torch.Tensor):
        raise WeightMismatchError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    t = t.detach().cpu().contiguous()
    # numpy has no bfloat16 of its own: reinterpret the bits as ml_dtypes.bfloat16 (exact, no rounding).
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _load_torch_file(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # torch is only in the [dev] extra
        raise ImportError(f"reading {path} needs torch (pip install 'idmr_jax[dev]'), or convert it to safetensors") from e
    # weights_only=True: a restricted unpickler that only rebuilds tensors and plain containers.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: not a weights-only checkpoint ({_refusal_reason(e)}); it cannot be loaded "
                           f"safely") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:  # torch's errors for truncated / corrupt files
        raise ConvertError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
                           f"({type(e).__name__}: {_first_sentence(str(e))})") from None
    # Training checkpoints (LAVIS, Lightning) wrap the weights: {"model": sd, "optimizer": ..., "epoch": ...}.
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ConvertError(f"{path}: expected a state dict (a mapping of tensors), got {type(obj).__name__}")
    return {k: _torch_to_numpy(k, v) for k, v in obj.items()}


def _first_sentence(text: str) -> str:
    return " ".join(text.split()).split(". ")[0].rstrip(".")


def _refusal_reason(error: pickle.UnpicklingError) -> str:
    # torch's message suggests retrying with weights_only=False, i.e. running the pickle: keep only the reason
    # (e.g. "Trying to load unsupported GLOBAL posix.system ..."), first sentence, one line.
    kept = [p for p in str(error).split("\n\n") if p.strip() and "weights_only" not in p]
    return _first_sentence(kept[0]) if kept else "its pickle holds more than tensors"


def _load_index(folder: Path, index_file: str, loader) -> dict[str, np.ndarray]:
    index_path = folder / index_file
    index = read_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index_path}: no \"weight_map\" object")
    # Every entry is checked before any shard is opened: a hostile index must not make us read outside `folder`.
    shards = sorted({shard_path(folder, index_path, entry) for entry in weight_map.values()})
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        part = loader(shard)
        dupes = set(part) & set(out)
        if dupes:
            raise WeightMismatchError(f"{folder}: tensors appear in more than one shard: {sorted(dupes)[:5]}")
        out.update(part)
    missing = sorted(set(index["weight_map"]) - set(out))
    if missing:
        raise WeightMismatchError(f"{folder}/{index_file} lists tensors no shard holds: {missing[:8]}")
    return out


def load_torch_state_dict(path: PathLike, *, float_dtype: Any = None, allow_nonfinite: bool = False
                          ) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into ``{name: numpy array}``.

    Args:
      path: a folder (``model.safetensors``, ``model.safetensors.index.json``, ``pytorch_model.bin`` or its
        index), a ``.safetensors`` file, or a ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file. Torch files are read
        with ``weights_only=True``; a ``{"model": state_dict, ...}`` wrapper (LAVIS) is unwrapped.
      float_dtype: None keeps every tensor's stored dtype (bfloat16 as ``ml_dtypes.bfloat16``); otherwise
        floating-point tensors are cast to it (e.g. ``np.float32`` to upcast half-precision checkpoints), each
        (from, to) dtype pair logged once.
      allow_nonfinite: accept NaN / inf in floating-point tensors (by default they raise ``ConvertError``
        naming the tensor and the count).

    Unreadable files (truncated safetensors, corrupt or unsafe pickles, index or shard errors) raise
    ``ConvertError`` naming the file.
    """
    path = Path(path)
    if path.is_dir():
        if (path / _SAFETENSORS_INDEX).exists():
            sd = _load_index(path, _SAFETENSORS_INDEX, _load_safetensors)
        elif (path / "model.safetensors").exists():
            sd = _load_safetensors(path / "model.safetensors")
        elif (path / _BIN_INDEX).exists():
            sd = _load_index(path, _BIN_INDEX, _load_torch_file)
        else:
            for name in _WEIGHT_FILES[1:]:
                if (path / name).exists():
                    sd = _load_torch_file(path / name)
                    break
            else:
                raise FileNotFoundError(
                    f"{path}: no weights found (looked for {', '.join(_WEIGHT_FILES)} and sharded indexes)")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    elif path.suffix == ".safetensors":
        sd = _load_safetensors(path)
    elif path.suffix in _TORCH_SUFFIXES:
        sd = _load_torch_file(path)
    else:
        raise ConvertError(f"{path}: unknown checkpoint type (expected a folder, .safetensors, or {_TORCH_SUFFIXES})")
    check_finite(sd, source=str(path), allow_nonfinite=allow_nonfinite)
    if float_dtype is not None:
        sd = cast_floats_to(sd, float_dtype, source=str(path))
    return sd


def cast_floats(state_dict: Mapping[str, Any], dtype: str | None) -> dict[str, Any]:
    """`state_dict` with its floating-point tensors cast to `dtype` ("float32", "bfloat16", "float16"); integer
    tensors (e.g. ``position_ids``) keep theirs. None or "" returns the tensors unchanged."""
    if not dtype:
        return dict(state_dict)
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: v.astype(target) if is_float_dtype(v.dtype) else v for k, v in state_dict.items()}


def hf_config_as_dict(hf_config: Any) -> dict[str, Any]:
    """A transformers config object (via ``to_dict()``) or an already plain mapping, as a dict."""
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def read_hf_config(path: PathLike) -> dict | None:
    """The ``config.json`` of a transformers folder (or next to a weights file), or None if there is none."""
    path = Path(path)
    candidate = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if candidate.exists():
        return read_json_file(candidate)
    return None


def save_torch_state_dict(state_dict: Mapping[str, Any], folder: PathLike, config_dict: Mapping | None = None,
                          *, metadata: Mapping[str, str] | None = None) -> Path:
    """Writes ``folder/model.safetensors`` (and ``folder/config.json`` if `config_dict` is given).

    Values may be numpy or JAX arrays (bfloat16 included). Returns the safetensors path.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns 0-d tensors (LAVIS `temp`) into shape (1,).
    tensors = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
    # transformers refuses safetensors files whose metadata does not name a known framework.
    meta = {"format": "pt", **(metadata or {})}
    out = folder / "model.safetensors"
    save_file(tensors, str(out), metadata=meta)
    if config_dict is not None:
        (folder / "config.json").write_text(json.dumps(dict(config_dict), indent=2, sort_keys=True) + "\n")
    return out


def safetensors_header(path: PathLike) -> dict:
    """The JSON header of a ``.safetensors`` file (names, dtypes, shapes) without reading any tensor."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))
