"""What every family's import / export / verify function shares: the user-facing error, the options the
command line passes (``python -m idmr_jax.convert``), config overrides, and reading a config file.

Family modules (:mod:`idmr_jax.weights.blip2`, :mod:`~idmr_jax.weights.adafocal`, ...) implement the formats;
:mod:`idmr_jax.weights.formats` names them; :mod:`idmr_jax.convert` is the command line over that registry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from idmr_jax.weights import io, torch_io
# ConvertError and log are defined with the input checks (below torch_io and mapping, which raise and log too);
# the families import them from here with the rest of what they share.
from idmr_jax.weights.checks import ConvertError, log, read_json_file

# Default verify tolerances (max abs difference over all compared outputs). float32 is the project-wide parity
# bound. bfloat16 runs the port in bf16 compute (float32 params) against the float32 reference: bf16 keeps 8
# mantissa bits (relative step 2^-8 ~ 4e-3) and LayerNorm'd activations are O(1-10), so a few layers already
# reach 1e-2..1e-1; 0.25 is a sanity bound that still catches wrong weights (those give O(1) differences).
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 0.25}

# Non-persistent buffers that older transformers versions wrote into checkpoints; never weights.
BUFFER_IGNORES: tuple[str, ...] = (r"(.*\.)?position_ids",)


@dataclasses.dataclass(frozen=True)
class ImportOptions:
    """Options of ``convert import`` (see its ``--help``); the defaults are the command line's."""

    config: str | None = None
    param_dtype: str | None = None
    seed: int = 0
    cross_attention_freq: int = 2
    encoder_hidden_size: int = 1408
    allow_missing_vision: bool = False
    allow_nonfinite: bool = False

    def overrides(self) -> dict[str, Any]:
        """Config fields set on the command line, for every sub-config that has them."""
        return {"param_dtype": self.param_dtype} if self.param_dtype else {}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Options of ``convert export``: `dtype` casts floating tensors (PyTorch formats), `drop_k_bias` drops a
    nonzero EVA key bias (LAVIS formats), `platforms` lists where a jax_serving artifact may run, `lora_adapter`
    writes the LM's LoRA as a PEFT adapter beside the unmerged base (MLLM formats)."""

    dtype: str | None = None
    drop_k_bias: bool = False
    platforms: Sequence[str] | None = None
    lora_adapter: bool = False


@dataclasses.dataclass
class Imported:
    """An imported model: its kind (``idmr_jax.weights.io.MODEL_KINDS``), module, config, and the params the
    checkpoint did not hold (freshly initialised)."""

    kind: str
    module: Any
    config: Any
    fresh: list[str]


def apply_overrides(config, overrides: Mapping[str, Any]):
    """Sets `overrides` on `config` and on every nested config dataclass that has those fields."""
    if not overrides:
        return config
    names = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in overrides.items() if k in names}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = apply_overrides(value, overrides)
    return dataclasses.replace(config, **changes)


def summarise_paths(paths: Sequence[str]) -> str:
    """Per-layer paths collapsed to one entry per kind ("fresh cross-attention in 6 layers" reads as one line)."""
    groups: dict[str, int] = {}
    for p in paths:
        key = re.sub(r"/\d+/", "/*/", p).rsplit("/", 1)[0]
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(sorted(groups))


def read_json(path: str | Path) -> dict:
    """A JSON config file (a folder means its ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConvertError(f"{path}: no such config file")
    return read_json_file(path)


def hf_config_of(src: Path, config: str | None) -> dict:
    """The transformers config of checkpoint `src`: `config` if given, else the ``config.json`` beside it."""
    cfg = read_json(config) if config else torch_io.read_hf_config(src)
    if cfg is None:
        raise ConvertError(f"{src}: no config.json next to the weights; pass --config PATH/TO/config.json")
    return cfg


def config_beside(src: Path) -> Path:
    """Where an export leaves ``model_config.json``: in folder `src`, or next to weights file `src`."""
    return (src if src.is_dir() else src.parent) / io.MODEL_CONFIG_FILE
