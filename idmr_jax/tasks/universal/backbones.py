"""The MLLM backbones the universal task's embedder is built on (``config.model.backbone``).

    llava     a CLIP ViT (or the demo's EfficientNet-Lite0) + MLP projector + a Qwen2 / Llama LM
              (transformers ``LlavaForConditionalGeneration``; ``init.format = "hf_llava"``)
    internvl  InternViT + pixel shuffle + LayerNorm-MLP projector + a Qwen2 LM: IDMR's backbone
              (``InternVLForConditionalGeneration``; ``hf_internvl``); one 448 px tile per image in training
    qwen2vl   the Qwen2-VL ViT (2D RoPE) + 2x2 patch merger + a Qwen2 LM with M-RoPE: LamRA's backbone
              (``Qwen2VLForConditionalGeneration``; ``hf_qwen2vl``); every image at the fixed ``data.image_size``

Every backbone's model implements the embedder contract the trainer, the evaluations, search and the reranker call:
``vision_features(pixels)``, ``embed_from_vision(features, ids, mask, has_image=...)``, ``embed``, ``hidden_states``,
``logits``, ``cfg.tokens_per_image(image_size)``, and the parameter paths ``vision/``, ``projector/``, ``lm/`` (what
``freeze_vision`` / ``train_projector`` / LoRA select). Without a checkpoint the sizes come from ``config.model``:
``vision.kind`` "internvit" / "qwen2vl_vit" with ``width``, ``depth``, ``num_heads``, ``mlp_dim``, ``patch_size``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import ml_collections

BACKBONES = ("llava", "internvl", "qwen2vl")
INIT_FORMATS = {"llava": "hf_llava", "internvl": "hf_internvl", "qwen2vl": "hf_qwen2vl"}
_WEIGHTS = {"llava": ("idmr_jax.weights.llava", "llava_config_from_hf"),
            "internvl": ("idmr_jax.weights.internvl", "internvl_config_from_hf"),
            "qwen2vl": ("idmr_jax.weights.qwen2vl", "qwen2vl_config_from_hf")}


def backbone_of(m: ml_collections.ConfigDict) -> str:
    """``config.model.backbone`` ("llava" when absent: configs saved before the field existed), checked."""
    name = m.get("backbone", "llava")
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone = {name!r}: use one of {BACKBONES}")
    return name


def checkpoint_config(backbone: str, path: str):
    """The model config of a transformers checkpoint folder of `backbone` (its config.json)."""
    from idmr_jax.weights import torch_io

    module, reader = _WEIGHTS[backbone]
    return getattr(importlib.import_module(module), reader)(torch_io.read_hf_config(path))


def checkpoint_params(backbone: str, path: str, cfg) -> dict[str, Any]:
    """The flat params of a transformers checkpoint of `backbone` for model config `cfg` (strict: every tensor)."""
    import numpy as np

    from idmr_jax.weights.torch_io import load_torch_state_dict

    module = importlib.import_module(_WEIGHTS[backbone][0])
    converted, _ = module.convert_state_dict(load_torch_state_dict(path, float_dtype=np.float32), cfg, source=path)
    return converted


def with_fields(cfg, **fields):
    """`dataclasses.replace` with only the `fields` the config class has (a Qwen2-VL config has no projector
    dtypes: its projector is the vision tower's merger)."""
    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in fields.items() if k in names})


def sized_vision(backbone: str, v: ml_collections.ConfigDict, text_width: int, dtypes: dict[str, str]):
    """The vision config of a backbone without a checkpoint, its sizes from ``config.model.vision``."""
    if backbone == "internvl":
        from idmr_jax.models.internvit import InternViTConfig

        return InternViTConfig(width=v.width, depth=v.depth, num_heads=v.num_heads, mlp_dim=v.mlp_dim,
                               patch_size=v.patch_size, image_size=v.image_size, **dtypes)
    from idmr_jax.models.qwen2vl_vision import Qwen2VLVisionConfig

    return Qwen2VLVisionConfig(depth=v.depth, embed_dim=v.width, hidden_size=text_width, num_heads=v.num_heads,
                               mlp_ratio=v.mlp_dim / v.width, patch_size=v.patch_size, **dtypes)


def sized_config(backbone: str, m: ml_collections.ConfigDict, vision, text, **common):
    """The embedder config of an InternVL / Qwen2-VL backbone without a checkpoint (`common`: fields the class
    lacks are left out)."""
    if backbone == "internvl":
        from idmr_jax.models.internvl import InternVLConfig

        cfg = InternVLConfig(vision=vision, text=text, image_token_id=m.image_token_id,
                             vision_feature_layer=m.vision_feature_layer)
        return with_fields(cfg, **common)
    from idmr_jax.models.qwen2vl import Qwen2VLConfig

    return with_fields(Qwen2VLConfig(vision=vision, text=text, image_token_id=m.image_token_id), **common)


def build_embedder(cfg, *, rngs):
    """The embedder module of a backbone's model config."""
    from idmr_jax.models.internvl import InternVLConfig, InternVLEmbedder
    from idmr_jax.models.llava import LlavaEmbedder
    from idmr_jax.models.qwen2vl import Qwen2VLConfig, Qwen2VLEmbedder

    if isinstance(cfg, InternVLConfig):
        return InternVLEmbedder(cfg, rngs=rngs)
    if isinstance(cfg, Qwen2VLConfig):
        return Qwen2VLEmbedder(cfg, rngs=rngs)
    return LlavaEmbedder(cfg, rngs=rngs)


def model_kind(cfg) -> str:
    """The model kind (`idmr_jax.weights.io.MODEL_KINDS`) a backbone's config is saved under."""
    from idmr_jax.weights import io

    return io.kind_of(cfg)
