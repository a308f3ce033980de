"""Name maps and config conversion between transformers CLIP checkpoints and idmr_jax's CLIP ports.

* :func:`hf_clip_text_rules`: ``CLIPTextModel`` names (relative to it; ``CLIPModel`` puts them under
  ``text_model.``) <-> :class:`~idmr_jax.models.clip_text.CLIPTextTransformer`. The encoder layers use the
  ViT's CLIP rules (same ``CLIPEncoderLayer``).
* :func:`hf_clip_map`: a whole ``CLIPModel`` <-> :class:`~idmr_jax.models.clip.CLIPModel`.
* :func:`load_hf_clip`: a transformers ``CLIPModel`` folder as a :class:`~idmr_jax.models.clip.CLIPModel`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

from idmr_jax.models.clip import CLIPConfig, CLIPModel
from idmr_jax.models.clip_text import CLIPTextConfig
from idmr_jax.models.vit import ViTConfig
from idmr_jax.weights import torch_io, vit
from idmr_jax.weights.conversion import BUFFER_IGNORES
from idmr_jax.weights.mapping import LINEAR, NameMap, Rule, load_into, prefixed
from idmr_jax.weights.torch_io import hf_config_as_dict

# Non-persistent buffers older transformers versions wrote into checkpoints.
HF_CLIP_IGNORED = BUFFER_IGNORES


def hf_clip_text_rules(cfg: CLIPTextConfig) -> list[Rule]:
    """Rules for transformers ``CLIPTextModel`` names (hub ``CLIPModel`` checkpoints add ``text_model.``)."""
    layer_rules = [r for r in vit.hf_clip_vision_rules(cfg.block_config()) if r.torch.startswith("encoder.")]
    return [
        Rule("embeddings.token_embedding.weight", "token_embed"),
        Rule("embeddings.position_embedding.weight", "pos_embed"),
        *layer_rules,
        Rule("final_layer_norm.weight", "final_norm/scale"),
        Rule("final_layer_norm.bias", "final_norm/bias"),
    ]


def hf_clip_map(cfg: CLIPConfig) -> NameMap:
    """The full ``CLIPModel`` map (both towers, both projections, ``logit_scale``)."""
    return NameMap([
        *prefixed(vit.hf_clip_vision_rules(cfg.vision), "vision_model.", "vision/"),
        *prefixed(hf_clip_text_rules(cfg.text), "text_model.", "text/"),
        Rule("visual_projection.weight", "visual_projection/kernel", LINEAR),
        Rule("text_projection.weight", "text_projection/kernel", LINEAR),
        Rule("logit_scale", "logit_scale"),
    ])


# ----------------------------------------------------------------------------------------------
# transformers config <-> CLIPConfig.

_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _fields(cls, overrides: Mapping[str, Any]) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in overrides.items() if k in names}


def clip_text_config_from_hf(hf_text_config: Any, **overrides) -> CLIPTextConfig:
    """A :class:`CLIPTextConfig` from a transformers ``CLIPTextConfig`` (or its dict)."""
    c = hf_config_as_dict(hf_text_config)
    if c.get("hidden_act") not in _HF_ACT:
        raise ValueError(f"unsupported CLIP text hidden_act {c.get('hidden_act')!r}")
    eos = c.get("eos_token_id")
    if isinstance(eos, list | tuple):
        raise ValueError(f"CLIP text pooling needs one eos_token_id, config has {eos}")
    kwargs = dict(vocab_size=int(c["vocab_size"]), width=int(c["hidden_size"]), depth=int(c["num_hidden_layers"]),
                  num_heads=int(c["num_attention_heads"]), mlp_dim=int(c["intermediate_size"]),
                  max_positions=int(c["max_position_embeddings"]), act=_HF_ACT[c["hidden_act"]],
                  layer_norm_eps=float(c.get("layer_norm_eps") or 1e-5),
                  eos_token_id=int(eos if eos is not None else 49407),
                  pad_token_id=int(c.get("pad_token_id") if c.get("pad_token_id") is not None else 1))
    return CLIPTextConfig(**{**kwargs, **_fields(CLIPTextConfig, overrides)})


def clip_config_from_hf(hf_config: Any, **overrides) -> CLIPConfig:
    """A :class:`CLIPConfig` from a transformers ``CLIPConfig`` (or its config.json dict). `overrides` go to every
    sub-config that has the field (``dtype``, ``param_dtype``, ``scan``, ``remat``, ``precision``)."""
    c = hf_config_as_dict(hf_config)
    if c.get("model_type") != "clip":
        raise ValueError(f"expected a transformers CLIP config (model_type 'clip'), got {c.get('model_type')!r}")
    vision_dict = {**c.get("vision_config", {}), "model_type": "clip_vision_model"}
    vision = vit.vit_config_from_hf(vision_dict, **_fields(ViTConfig, overrides))
    text = clip_text_config_from_hf(c.get("text_config", {}), **overrides)
    return CLIPConfig(vision=vision, text=text, projection_dim=int(c.get("projection_dim", 512)),
                      logit_scale_init=float(c.get("logit_scale_init_value", 2.6592)))


def hf_clip_text_config_kwargs(cfg: CLIPTextConfig) -> dict[str, Any]:
    """Keyword arguments of a transformers ``CLIPTextConfig`` for `cfg`."""
    to_hf = {v: k for k, v in _HF_ACT.items() if k != "gelu_new"}
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                max_position_embeddings=cfg.max_positions, hidden_act=to_hf[cfg.act],
                layer_norm_eps=cfg.layer_norm_eps, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


def hf_clip_config(cfg: CLIPConfig):
    """The matching transformers ``CLIPConfig`` (imports transformers lazily)."""
    import transformers

    return transformers.CLIPConfig(
        text_config=hf_clip_text_config_kwargs(cfg.text),
        vision_config=vit.hf_vision_config_kwargs(cfg.vision),
        projection_dim=cfg.projection_dim, logit_scale_init_value=cfg.logit_scale_init)


def load_hf_clip(folder: str | os.PathLike, **overrides) -> tuple[CLIPModel, CLIPConfig]:
    """A :class:`CLIPModel` with the weights of a transformers ``CLIPModel`` folder (config.json + safetensors;
    a sharded index or a ``pytorch_model.bin`` read with ``weights_only=True`` work too), loaded strictly.

    `overrides` set execution fields on both towers (``dtype``, ``scan``, ``remat``, ...).
    """
    hf_cfg = torch_io.read_hf_config(folder)
    if hf_cfg is None:
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
    cfg = clip_config_from_hf(hf_cfg, **overrides)
    sd = torch_io.load_torch_state_dict(folder)
    flat = hf_clip_map(cfg).torch_to_flax(sd, source=str(folder), ignore=HF_CLIP_IGNORED)
    model = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
    load_into(model, flat, source=str(folder))
    return model, cfg
