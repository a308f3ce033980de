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

Loading and export (format ``hf_llava``), and LoRA adapter export for PEFT:

* :func:`load_hf_llava`: a folder (config.json + safetensors / sharded index / ``pytorch_model.bin`` read with
  ``weights_only=True``) in any of the layouts above, loaded strictly.
* :func:`export_hf_llava`: LlavaEmbedder params -> ``model.safetensors`` (transformers' ``save_pretrained``
  layout) + ``config.json``. LoRA factors, if the checkpoint has them, are merged into the kernels first (the
  exported model then computes what the embedder computes); use :func:`export_lora_adapter` to keep them apart.
* The parity check against transformers is :mod:`idmr_jax.weights.llava_verify`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from idmr_jax.models import lora as lora_lib
from idmr_jax.models.llava import LlavaConfig, LlavaEmbedder
from idmr_jax.models.vit import ViTConfig
from idmr_jax.weights import decoder_lm, peft, torch_io, vit
from idmr_jax.weights.checks import read_json_file
from idmr_jax.weights.conversion import BUFFER_IGNORES, ExportOptions, Imported, ImportOptions, log
from idmr_jax.weights.mapping import (LINEAR, NameMap, Rule, WeightMismatchError, flatten_params, load_into, prefixed,
                                      unstack_from_model)
from idmr_jax.weights.torch_io import hf_config_as_dict

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
HF_LLAVA_IGNORED = BUFFER_IGNORES


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
        *prefixed(vit.hf_clip_vision_rules(cfg.vision), p["vision"], "vision/"),
        *prefixed(projector_rules(cfg), p["projector"], "projector/"),
        *decoder_lm.decoder_lm_rules(cfg.text, prefix=p["lm"], lm_head=p["lm_head"], flax_prefix="lm/"),
    ])


# ----------------------------------------------------------------------------------------------
# transformers config <-> LlavaConfig.


def llava_config_from_hf(hf_config: Any, **overrides) -> LlavaConfig:
    """A :class:`LlavaConfig` from a transformers ``LlavaConfig`` (or its config.json dict).

    `overrides` are LlavaConfig fields (``pooling``, ``pooling_token_id``, ...); execution options for the towers
    (dtype, scan, ...) go through ``dataclasses.replace`` on ``vision`` / ``text`` by the caller.
    """
    c = hf_config_as_dict(hf_config)
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
        vision=vit.vit_config_from_hf(vision_cfg), text=text, image_token_id=int(image_token),
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
        "vision_config": {"model_type": "clip_vision_model", **vit.hf_vision_config_kwargs(cfg.vision)},
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": {v: k for k, v in _PROJECTOR_ACT.items()}[cfg.projector_hidden_act],
        "multimodal_projector_bias": cfg.multimodal_projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


# ----------------------------------------------------------------------------------------------
# Load / export.


EXEC_FIELDS = ("dtype", "param_dtype", "scan", "remat", "precision")


def with_exec(cfg: LlavaConfig, overrides: Mapping[str, Any]) -> LlavaConfig:
    """Applies execution options (dtype, scan, ...) to the vision and text sub-configs that have them, and any
    other key as a LlavaConfig field (pooling, pooling_token_id, ...); ``lora`` goes to the text config."""
    exec_opts = {k: v for k, v in overrides.items() if k in EXEC_FIELDS}
    rest = {k: v for k, v in overrides.items() if k not in EXEC_FIELDS and k != "lora"}

    def apply(sub):
        names = {f.name for f in dataclasses.fields(sub)}
        return dataclasses.replace(sub, **{k: v for k, v in exec_opts.items() if k in names})

    text = apply(cfg.text)
    if "lora" in overrides:
        text = dataclasses.replace(text, lora=overrides["lora"])
    return dataclasses.replace(cfg, vision=apply(cfg.vision), text=text, **rest)


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: LlavaConfig, *, source: str = "checkpoint"
                       ) -> tuple[dict[str, np.ndarray], str]:
    """(flat flax params, layout) of a transformers LLaVA state dict; strict about missing / extra tensors."""
    layout = detect_layout(sd, source=source)
    p = LAYOUTS[layout]
    sd = decoder_lm.drop_tied_head(sd, cfg.text, prefix=p["lm"], lm_head=p["lm_head"], source=source)
    flat = hf_llava_map(cfg, layout).torch_to_flax(sd, source=source,
                                                               ignore=HF_LLAVA_IGNORED)
    return flat, layout


def _base_filter(cfg: LlavaConfig):
    return nnx.All(nnx.Param, nnx.Not(lora_lib.lora_filter)) if cfg.text.lora is not None else nnx.Param


def load_hf_llava(src: str | os.PathLike, *, config: str | os.PathLike | None = None, seed: int = 0,
                  allow_nonfinite: bool = False, **overrides) -> tuple[LlavaEmbedder, LlavaConfig]:
    """A :class:`LlavaEmbedder` with the weights of a transformers LLaVA checkpoint, loaded strictly.

    `config`: the config.json (default: next to the weights). `allow_nonfinite`: accept NaN / inf weights
    (``idmr_jax.weights.checks``). `overrides`: execution options for both towers
    (``dtype``, ``scan``, ...), LlavaConfig fields (``pooling``, ``pooling_token_id``, ...) and ``lora`` (a
    :class:`~idmr_jax.models.lora.LoRAConfig` for the LM: fresh adapters, B = 0, so the outputs are unchanged).
    """
    src = Path(src)
    cfg_dict = read_json_file(config) if config else torch_io.read_hf_config(src)
    if cfg_dict is None:
        raise FileNotFoundError(f"{src}: no config.json next to the weights (pass config=...)")
    cfg = with_exec(llava_config_from_hf(cfg_dict), overrides)
    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=allow_nonfinite)
    flat, _ = convert_state_dict(sd, cfg, source=str(src))
    def build():
        return LlavaEmbedder(cfg, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(build)  # the base params all come from src: no random init of them
    graphdef, base, rest = nnx.split(model, _base_filter(cfg), ...)
    if jax.tree.leaves(rest):
        # Fresh LoRA factors (and dropout RNG state) only: under jit, XLA drops the unused base initialisers.
        rest = jax.jit(lambda: nnx.split(build(), _base_filter(cfg), ...)[2])()
    model = nnx.merge(graphdef, base, rest)
    load_into(model, flat, source=str(src), variables=_base_filter(cfg))
    return model, cfg


def hf_state_dict(flat: Mapping[str, Any], cfg: LlavaConfig, *, layout: str = "saved") -> dict[str, np.ndarray]:
    """transformers-named tensors of flat LlavaEmbedder params (scanned layers unstacked; LoRA factors merged)."""
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if any(lora_lib.is_lora_path(k) for k in flat):
        flat = lora_lib.merge(flat, cfg.text.lora)
    name_map = hf_llava_map(cfg, layout)
    return name_map.flax_to_torch(unstack_from_model(flat, name_map))


def export_hf_llava(out: str | os.PathLike, cfg: LlavaConfig, flat: Mapping[str, Any], *, kind: str = "llava",
                    dtype: str | None = None, src: str = "checkpoint", log=None) -> Path:
    """Writes LlavaEmbedder params (`flat`, module layout, e.g. ``io.restore_params`` of an ``import`` output or a
    training checkpoint) as ``out/model.safetensors`` + ``out/config.json`` in transformers' ``save_pretrained``
    layout. `dtype` casts floating tensors; `src` names the source in messages, `log` receives notes."""
    if kind != "llava":
        raise WeightMismatchError(f"{src}: holds a {kind!r} model; hf_llava needs a llava model")
    if any(lora_lib.is_lora_path(k) for k in flat) and log is not None:
        log(f"{src}: merging the LoRA factors into the LM kernels for the full-model export "
            "(idmr_jax.weights.llava.export_lora_adapter writes them as a PEFT adapter instead)")
    sd = torch_io.cast_floats(hf_state_dict(flat, cfg), dtype)
    cfg_dict = hf_llava_config_dict(cfg)
    if dtype:
        cfg_dict["dtype"] = dtype
    return torch_io.save_torch_state_dict(sd, out, cfg_dict)


def export_lora_adapter(model_or_flat: Any, cfg: LlavaConfig, out_dir: str | os.PathLike, *,
                        include_projector: bool = False, base_model_name_or_path: str = "") -> Path:
    """The LM's LoRA adapter as a PEFT folder for ``LlavaForConditionalGeneration`` (module prefix
    ``model.language_model.``). `include_projector` also saves the projector as a fully trained module
    (PEFT ``modules_to_save``). The adapter's ``target_modules`` is a regex restricted to the language model:
    the CLIP tower also has ``q_proj`` / ``k_proj`` / ``v_proj`` modules that short names would match.
    """
    if cfg.text.lora is None:
        raise ValueError("the LLaVA config has no LoRA on its language model (cfg.text.lora is None)")
    flat = flatten_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    extra = modules = None
    if include_projector:
        proj_map = NameMap(prefixed(projector_rules(cfg), "model.multi_modal_projector.", "projector/"))
        extra = proj_map.flax_to_torch({k: np.asarray(v) for k, v in flat.items() if k.startswith("projector/")})
        modules = ["multi_modal_projector"]
    out = peft.export_peft_adapter(
        flat, cfg.text, out_dir, module_prefix=LM_MODULE_PREFIX, flax_prefix="lm/",
        base_model_name_or_path=base_model_name_or_path, task_type=None, extra_tensors=extra,
        modules_to_save=modules)
    meta_path = Path(out) / peft.ADAPTER_CONFIG
    meta = json.loads(meta_path.read_text())
    names = "|".join(meta["target_modules"])
    meta["target_modules"] = rf".*{LM_MODULE_PREFIX.rstrip('.')}\..*\.({names})"
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def import_hf_llava(src: Path, opts: ImportOptions) -> Imported:
    """``convert import --format hf_llava``: :func:`load_hf_llava` with the command line's options."""
    model, cfg = load_hf_llava(src, config=opts.config, seed=opts.seed, allow_nonfinite=opts.allow_nonfinite,
                               **opts.overrides())
    return Imported("llava", model, cfg, [])


def export_source(source, src, out, opts: ExportOptions) -> Path:
    """``convert export --format hf_llava`` of an export source (``idmr_jax.weights.workdir.read_source``)."""
    return export_hf_llava(out, source.model_config, source.flat, kind=source.kind, dtype=opts.dtype,
                           src=str(src), log=log)
