"""Name map and config conversion between transformers ``LlavaForConditionalGeneration`` and
:class:`idmr_jax.models.llava.LlavaEmbedder` (CLIP vision tower + Qwen2 / Llama decoder).

Checkpoints come in three layouts, told apart by their key prefixes (:func:`detect_layout`):

============  ==============================  ===========================  ===================================
layout        language model                  lm head                      vision tower / projector
============  ==============================  ===========================  ===================================
"saved"       ``language_model.model.``       ``language_model.lm_head``   ``vision_tower.`` /
                                                                           ``multi_modal_projector.``
"hub"         as "saved"                      as "saved"                   ``vision_tower.vision_model.`` / as
                                                                           "saved" (llava-hf checkpoints)
"module"      ``model.language_model.``       ``lm_head``                  ``model.vision_tower.`` /
                                                                           ``model.multi_modal_projector.``
============  ==============================  ===========================  ===================================

transformers 5.23's ``save_pretrained`` writes "saved" (it reverts its load-time renames, but not CLIP's dropped
``vision_model.`` prefix); "hub" is what llava-hf published; "module" is ``model.state_dict()`` in memory.
``from_pretrained`` reads all three. The CLIP ``post_layernorm`` is part of the checkpoint although LLaVA never
uses it (the features come from an inner layer); it is carried through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idmr_jax.models import decoder_lm
from idmr_jax.models.llava import LlavaConfig
from idmr_jax.models.vit import ViTConfig
from idmr_jax.weights import vit_names
from idmr_jax.weights.lm_names import decoder_lm_rules
from idmr_jax.weights.mapping import LINEAR, NameMap, Rule, prefixed

LAYOUTS: dict[str, dict[str, str]] = {
    "saved": dict(lm="language_model.model.", lm_head="language_model.lm_head", vision="vision_tower.",
                  projector="multi_modal_projector."),
    "hub": dict(lm="language_model.model.", lm_head="language_model.lm_head", vision="vision_tower.vision_model.",
                projector="multi_modal_projector."),
    "module": dict(lm="model.language_model.", lm_head="lm_head", vision="model.vision_tower.",
                   projector="model.multi_modal_projector."),
}
# The decoder's module path inside a (PEFT-wrapped) transformers 5 LlavaForConditionalGeneration.
LM_MODULE_PREFIX = "model.language_model."
# Buffers older transformers versions wrote into checkpoints.
HF_LLAVA_IGNORED = (r"(.*\.)?position_ids",)


def detect_layout(state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> str:
    """The layout of a LLaVA state dict (see the module docstring)."""
    keys = list(state_dict)
    if any(k.startswith("model.language_model.") for k in keys):
        return "module"
    if any(k.startswith("language_model.model.") for k in keys):
        return "hub" if any(k.startswith("vision_tower.vision_model.") for k in keys) else "saved"
    raise ValueError(f"{source}: not a LLaVA checkpoint (no 'language_model.model.*' or "
                     f"'model.language_model.*' tensors; e.g. {sorted(keys)[:4]})")


def projector_rules(cfg: LlavaConfig) -> list[Rule]:
    """Rules of the multimodal projector, relative to it."""
    rules = []
    for name in ("linear_1", "linear_2"):
        rules.append(Rule(f"{name}.weight", f"{name}/kernel", LINEAR))
        if cfg.multimodal_projector_bias:
            rules.append(Rule(f"{name}.bias", f"{name}/bias"))
    return rules


def hf_llava_map(cfg: LlavaConfig, layout: str = "saved") -> NameMap:
    """The full ``LlavaForConditionalGeneration`` map in `layout` (base weights; LoRA factors excluded)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LLaVA layout {layout!r}; known: {sorted(LAYOUTS)}")
    if not isinstance(cfg.vision, ViTConfig) or cfg.vision.style != "clip":
        raise ValueError("the transformers LLaVA map needs a CLIP-style ViT vision tower")
    p = LAYOUTS[layout]
    return NameMap([
        *prefixed(vit_names.hf_clip_vision_rules(cfg.vision), p["vision"], "vision/"),
        *prefixed(projector_rules(cfg), p["projector"], "projector/"),
        *decoder_lm_rules(cfg.text, prefix=p["lm"], lm_head=p["lm_head"], flax_prefix="lm/"),
    ])


# ----------------------------------------------------------------------------------------------
# transformers config <-> LlavaConfig.


def llava_config_from_hf(hf_config: Any, **overrides) -> LlavaConfig:
    """A :class:`LlavaConfig` from a transformers ``LlavaConfig`` (or its config.json dict).

    `overrides` are LlavaConfig fields (``pooling``, ``pooling_token_id``, ...); execution options for the towers
    (dtype, scan, ...) go through ``dataclasses.replace`` on ``vision`` / ``text`` by the caller.
    """
    c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
    if c.get("model_type") != "llava":
        raise ValueError(f"expected a transformers LLaVA config (model_type 'llava'), got {c.get('model_type')!r}")
    vision_cfg = dict(c.get("vision_config") or {})
    if vision_cfg.get("model_type") != "clip_vision_model":
        raise ValueError(f"only CLIP vision towers are supported, got vision model_type "
                         f"{vision_cfg.get('model_type')!r}")
    text_cfg = dict(c.get("text_config") or {})
    tie = bool(c.get("tie_word_embeddings") or text_cfg.get("tie_word_embeddings"))
    text = decoder_lm.config_from_hf({**text_cfg, "tie_word_embeddings": tie})
    layer = c.get("vision_feature_layer", -2)
    image_token = c.get("image_token_index", c.get("image_token_id"))
    if image_token is None:
        raise ValueError("LLaVA config has no image_token_index")
    kwargs = dict(
        vision=vit_names.vit_config_from_hf(vision_cfg), text=text, image_token_id=int(image_token),
        vision_feature_layer=tuple(layer) if isinstance(layer, list | tuple) else int(layer),
        vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=_projector_act(c.get("projector_hidden_act", "gelu")),
        multimodal_projector_bias=bool(c.get("multimodal_projector_bias", True)),
        image_seq_length=int(c.get("image_seq_length", 576)))
    return LlavaConfig(**{**kwargs, **overrides})


_PROJECTOR_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _projector_act(name: str) -> str:
    if name not in _PROJECTOR_ACT:
        raise ValueError(f"unsupported projector_hidden_act {name!r}; known: {sorted(_PROJECTOR_ACT)}")
    return _PROJECTOR_ACT[name]


def hf_llava_config_dict(cfg: LlavaConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `cfg` (``LlavaConfig.from_dict`` accepts it)."""
    if not isinstance(cfg.vision, ViTConfig) or cfg.vision.style != "clip":
        raise ValueError("transformers LLaVA export needs a CLIP-style ViT vision tower")
    text = decoder_lm.hf_config_dict(cfg.text)
    text.pop("architectures", None)
    layer = cfg.vision_feature_layer
    return {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "vision_config": {"model_type": "clip_vision_model", **vit_names.hf_vision_config_kwargs(cfg.vision)},
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": {v: k for k, v in _PROJECTOR_ACT.items()}[cfg.projector_hidden_act],
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
