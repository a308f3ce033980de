"""Named benchmark configurations, built on ``configs/oacir.py`` so the benchmarks train what the trainer trains.

``--config`` takes a preset name or any trainer config, ``configs/oacir.py[:KEYWORDS]``:

  tiny      ``configs/oacir.py:tiny,fake`` with a 2-layer Q-Former and a 1024-word vocabulary: tests
  cpu_mid   EVA ViT 256 wide, 4 layers, 224 px (257 tokens); Q-Former 256 wide, 4 layers; 32 queries;
            batch 8; float32. One step takes about a second on a 2-core CPU.
  demo      the laptop demo's model (frozen EfficientNet-Lite0 + 384-wide 6-layer Q-Former), batch 32
  vitg      the paper's model: EVA ViT-g/14 (39 blocks, frozen, scanned) + BERT-base Q-Former, batch 32 per device,
            ViT in bfloat16; for accelerators

Every preset reads synthetic batches of the right shapes (``data.source=fake``), never a dataset. ``baseline``
(the standard CIR baseline, no CAAM) is a keyword of configs/oacir.py and can be added to any preset:
``--config=cpu_mid,baseline``. Sizes the trainer config has no field for (the ViT's width and depth for
``cpu_mid``) live in ``config.model.vision.overrides`` and are applied by :func:`model_config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from idmr_jax import precision
from idmr_jax.models.adafocal import AdaFocalConfig

# The bench presets: (configs/oacir.py keywords, overrides applied to the resulting ConfigDict).
PRESETS: dict[str, tuple[str, dict]] = {
    # 2 Q-Former layers (one with cross-attention) and a 1024-word vocabulary: compiles in seconds.
    "tiny": ("tiny,fake", {"data.batch_size": 8, "model.qformer.num_layers": 2, "model.qformer.vocab_size": 1024}),
    "cpu_mid": ("fake", {
        "precision": "float32", "model.vision.variant": "eva-g/14", "model.vision.scan": False,
        "model.vision.overrides": dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
        "model.qformer.hidden_size": 256, "model.qformer.num_layers": 4, "model.qformer.num_heads": 4,
        "model.qformer.intermediate_size": 1024,
        "model.caam.num_heads": 4, "model.caam.ffn_dim": 1024, "model.caam.head_hidden": 256,
        "data.batch_size": 8}),
    # The demo's own frozen-encoder cache reads real shards; the bench's --vit-cache does the same on fake data.
    "demo": ("demo", {"data.source": "fake", "train.cache_frozen_vision": False}),
    "vitg": ("fake", {"data.batch_size": 32}),  # per device: scaled by the device count in `load`
}

# Vision fields a preset may override beyond the trainer config's (see the module docstring).
_VISION_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size")


def _oacir_module():
    path = Path(__file__).resolve().parents[2] / "configs" / "oacir.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the benchmarks need the repository's configs/ folder "
                                "(run them from a clone of the repository)")
    spec = importlib.util.spec_from_file_location("idmr_bench_oacir_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def set_field(config: ml_collections.ConfigDict, dotted: str, value, *, must_exist: bool = False) -> None:
    """``config.<dotted> = value``; with `must_exist`, a KeyError naming a field the config does not have."""
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    if must_exist and leaf not in node:
        raise KeyError(f"config field {dotted!r} does not exist")
    node[leaf] = value


def from_file(name: str) -> ml_collections.ConfigDict:
    """``get_config(ARGS)`` of a config file named as ``path/to/file.py[:ARGS]``."""
    path, _, arg = name.partition(":")
    spec = importlib.util.spec_from_file_location("idmr_bench_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def load(name: str, *, dtype: str | None = None, batch_size: int | None = None, device_count: int = 1
         ) -> ml_collections.ConfigDict:
    """The config for ``--config=NAME[,KEYWORD...]`` (a preset plus configs/oacir.py keywords) or
    ``--config=path/to/file.py[:ARGS]``.

    `dtype` sets ``config.precision`` (``bfloat16`` -> "bf16", see idmr_jax/precision.py); `batch_size` the global
    batch (default: the preset's, for ``vitg`` 32 per device).
    """
    if ".py" in name:
        config = from_file(name)
    else:
        preset, _, extra = name.partition(",")
        if preset not in PRESETS:
            raise ValueError(f"unknown bench config {preset!r}; presets: {sorted(PRESETS)} (or configs/oacir.py:ARGS)")
        keywords, overrides = PRESETS[preset]
        config = _oacir_module().get_config(",".join(filter(None, [keywords, extra])))
        for key, value in overrides.items():
            set_field(config, key, value)
        if preset == "vitg":
            config.data.batch_size = 32 * device_count
    if dtype:
        config.precision = precision.policy_for_dtype(dtype)
    if batch_size:
        config.data.batch_size = int(batch_size)
    config.data.fake_pool = max(int(config.data.fake_pool), int(config.data.batch_size))
    config.train.progress = False
    return config


def model_config(config: ml_collections.ConfigDict) -> AdaFocalConfig:
    """The trainer's AdaFocalConfig for `config`, with ``model.vision.overrides`` applied to the ViT."""
    from idmr_jax.tasks.oacir.task import model_config as trainer_model_config

    mc = trainer_model_config(config)
    overrides = dict(config.model.vision.get("overrides", None) or {})
    if not overrides:
        return mc
    if unknown := set(overrides) - set(_VISION_FIELDS):
        raise ValueError(f"unknown model.vision.overrides {sorted(unknown)}; allowed: {_VISION_FIELDS}")
    vision = dataclasses.replace(mc.blip2.vision, **overrides)
    qformer = dataclasses.replace(mc.blip2.qformer, encoder_hidden_size=vision.width)
    return dataclasses.replace(mc, blip2=dataclasses.replace(mc.blip2, vision=vision, qformer=qformer))


def make_task(config: ml_collections.ConfigDict):
    """An :class:`~idmr_jax.tasks.oacir.task.OacirTask` whose model follows :func:`model_config`."""
    from idmr_jax.tasks.oacir.task import OacirTask

    task = OacirTask(config)
    task.model_config = model_config(config)
    return task
