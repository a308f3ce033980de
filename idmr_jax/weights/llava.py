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

The steps every MLLM format shares (``hf_internvl`` and ``hf_qwen2vl`` use them too) are public here:
:func:`with_exec`, :func:`load_hf_embedder`, :func:`state_dict_to_flax`, :func:`merged_state_dict`,
:func:`note_merged_lora`, :func:`write_hf_checkpoint`, :func:`import_with_options` and the activation names
(:func:`activation_from_hf` / :func:`activation_to_hf`); the LM's PEFT adapter is
:func:`idmr_jax.weights.peft.export_lm_lora_adapter`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
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
from idmr_jax.weights.mapping import LINEAR, NameMap, Rule, WeightMismatchError, load_into, prefixed, unstack_from_model
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
        projector_hidden_act=activation_from_hf(c.get("projector_hidden_act", "gelu")),
        multimodal_projector_bias=bool(c.get("multimodal_projector_bias", True)),
        image_seq_length=int(c.get("image_seq_length", 576)))
    return LlavaConfig(**{**kwargs, **overrides})


# transformers' activation names <-> idmr_jax.models.layers.activation's, for the MLLM projectors and towers.
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def activation_from_hf(name: str, field: str = "projector_hidden_act") -> str:
    """The layers.activation name of transformers' activation `name` (read from config `field`); an unsupported
    one raises ``ValueError``."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported {field} {name!r}; known: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def activation_to_hf(name: str) -> str:
    """transformers' name of the layers.activation `name` (the inverse of :func:`activation_from_hf`)."""
    return {v: k for k, v in HF_ACTIVATIONS.items()}[name]


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
        "projector_hidden_act": activation_to_hf(cfg.projector_hidden_act),
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


def state_dict_to_flax(sd: Mapping[str, np.ndarray], cfg: Any, name_map: NameMap, prefixes: Mapping[str, str], *,
                       source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Flat flax params of an MLLM state dict through `name_map` (strict about missing / extra tensors), after
    dropping a head tied to the embedding (`prefixes`: the layout's ``lm`` and ``lm_head`` prefixes)."""
    sd = decoder_lm.drop_tied_head(sd, cfg.text, prefix=prefixes["lm"], lm_head=prefixes["lm_head"], source=source)
    return name_map.torch_to_flax(sd, source=source, ignore=BUFFER_IGNORES)


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: LlavaConfig, *, source: str = "checkpoint"
                       ) -> tuple[dict[str, np.ndarray], str]:
    """(flat flax params, layout) of a transformers LLaVA state dict; strict about missing / extra tensors."""
    layout = detect_layout(sd, source=source)
    return state_dict_to_flax(sd, cfg, hf_llava_map(cfg, layout), LAYOUTS[layout], source=source), layout


def base_param_filter(cfg) -> Any:
    """The nnx filter of the params a transformers checkpoint holds: all but the LM's LoRA factors (for any MLLM
    embedder config with a ``text`` DecoderLMConfig)."""
    return nnx.All(nnx.Param, nnx.Not(lora_lib.lora_filter)) if cfg.text.lora is not None else nnx.Param


def load_hf_embedder(src: str | os.PathLike, *, config: str | os.PathLike | None, seed: int, allow_nonfinite: bool,
                     overrides: Mapping[str, Any], config_from_hf: Callable, convert_state_dict: Callable,
                     embedder: Callable) -> tuple[Any, Any]:
    """(model, config) of an MLLM embedder with the weights of a transformers checkpoint, loaded strictly: the
    shared steps of :func:`load_hf_llava` and the InternVL / Qwen2-VL loaders.

    `config_from_hf(config.json dict)` gives the embedder config (then :func:`with_exec` applies `overrides`);
    `convert_state_dict(sd, cfg, source=)` the flat params and layout; `embedder(cfg, rngs=)` builds the module.
    """
    src = Path(src)
    cfg_dict = read_json_file(config) if config else torch_io.read_hf_config(src)
    if cfg_dict is None:
        raise FileNotFoundError(f"{src}: no config.json next to the weights (pass config=...)")
    cfg = with_exec(config_from_hf(cfg_dict), overrides)
    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=allow_nonfinite)
    flat, _ = convert_state_dict(sd, cfg, source=str(src))

    def build():
        return embedder(cfg, rngs=nnx.Rngs(seed))

    model = nnx.eval_shape(build)  # the base params all come from src: no random init of them
    graphdef, base, rest = nnx.split(model, base_param_filter(cfg), ...)
    if jax.tree.leaves(rest):
        # Fresh LoRA factors (and dropout RNG state) only: under jit, XLA drops the unused base initialisers.
        rest = jax.jit(lambda: nnx.split(build(), base_param_filter(cfg), ...)[2])()
    model = nnx.merge(graphdef, base, rest)
    load_into(model, flat, source=str(src), variables=base_param_filter(cfg))
    return model, cfg


def load_hf_llava(src: str | os.PathLike, *, config: str | os.PathLike | None = None, seed: int = 0,
                  allow_nonfinite: bool = False, **overrides) -> tuple[LlavaEmbedder, LlavaConfig]:
    """A :class:`LlavaEmbedder` with the weights of a transformers LLaVA checkpoint, loaded strictly.

    `config`: the config.json (default: next to the weights). `allow_nonfinite`: accept NaN / inf weights
    (``idmr_jax.weights.checks``). `overrides`: execution options for both towers
    (``dtype``, ``scan``, ...), LlavaConfig fields (``pooling``, ``pooling_token_id``, ...) and ``lora`` (a
    :class:`~idmr_jax.models.lora.LoRAConfig` for the LM: fresh adapters, B = 0, so the outputs are unchanged).
    """
    return load_hf_embedder(src, config=config, seed=seed, allow_nonfinite=allow_nonfinite, overrides=overrides,
                            config_from_hf=llava_config_from_hf, convert_state_dict=convert_state_dict,
                            embedder=LlavaEmbedder)


def merged_state_dict(flat: Mapping[str, Any], lora: Any, name_map: NameMap) -> dict[str, np.ndarray]:
    """transformers-named tensors of flat embedder params through `name_map` (scanned layers unstacked; LoRA
    factors, configured by `lora`, merged into the kernels first)."""
    flat = {k: np.asarray(v) for k, v in flat.items()}
    if any(lora_lib.is_lora_path(k) for k in flat):
        flat = lora_lib.merge(flat, lora)
    return name_map.flax_to_torch(unstack_from_model(flat, name_map))


def hf_state_dict(flat: Mapping[str, Any], cfg: LlavaConfig, *, layout: str = "saved") -> dict[str, np.ndarray]:
    """transformers-named tensors of flat LlavaEmbedder params (scanned layers unstacked; LoRA factors merged)."""
    return merged_state_dict(flat, cfg.text.lora, hf_llava_map(cfg, layout))


def note_merged_lora(flat: Mapping[str, Any], *, src: str, log, adapter_export: str) -> None:
    """Tells `log` (if any) that a full-model export merges `flat`'s LoRA factors (when it has some), and that
    `adapter_export` (a function's dotted name) writes them as a PEFT adapter instead."""
    if any(lora_lib.is_lora_path(k) for k in flat) and log is not None:
        log(f"{src}: merging the LoRA factors into the LM kernels for the full-model export "
            f"({adapter_export} writes them as a PEFT adapter instead)")


def write_hf_checkpoint(out: str | os.PathLike, state_dict: Mapping[str, np.ndarray], config_dict: dict[str, Any],
                        dtype: str | None) -> Path:
    """``out/model.safetensors`` + ``out/config.json`` (transformers' ``save_pretrained`` files); `dtype` casts the
    floating tensors and is recorded in the config."""
    sd = torch_io.cast_floats(state_dict, dtype)
    if dtype:
        config_dict["dtype"] = dtype
    return torch_io.save_torch_state_dict(sd, out, config_dict)


def export_hf_llava(out: str | os.PathLike, cfg: LlavaConfig, flat: Mapping[str, Any], *, kind: str = "llava",
                    dtype: str | None = None, src: str = "checkpoint", log=None) -> Path:
    """Writes LlavaEmbedder params (`flat`, module layout, e.g. ``io.restore_params`` of an ``import`` output or a
    training checkpoint) as ``out/model.safetensors`` + ``out/config.json`` in transformers' ``save_pretrained``
    layout. `dtype` casts floating tensors; `src` names the source in messages, `log` receives notes."""
    if kind != "llava":
        raise WeightMismatchError(f"{src}: holds a {kind!r} model; hf_llava needs a llava model")
    note_merged_lora(flat, src=src, log=log, adapter_export="idmr_jax.weights.llava.export_lora_adapter")
    return write_hf_checkpoint(out, hf_state_dict(flat, cfg), hf_llava_config_dict(cfg), dtype)


def export_lora_adapter(model_or_flat: Any, cfg: LlavaConfig, out_dir: str | os.PathLike, *,
                        include_projector: bool = False, base_model_name_or_path: str = "") -> Path:
    """The LM's LoRA adapter as a PEFT folder for ``LlavaForConditionalGeneration`` (module prefix
    ``model.language_model.``). `include_projector` also saves the projector as a fully trained module
    (PEFT ``modules_to_save``). The adapter's ``target_modules`` is a regex restricted to the language model:
    the CLIP tower also has ``q_proj`` / ``k_proj`` / ``v_proj`` modules that short names would match.
    """
    projector = (NameMap(prefixed(projector_rules(cfg), "model.multi_modal_projector.", "projector/")),
                 "multi_modal_projector") if include_projector else None
    return peft.export_lm_lora_adapter(model_or_flat, cfg.text, out_dir, lm_prefix=LM_MODULE_PREFIX,
                                       projector=projector, base_model_name_or_path=base_model_name_or_path)


def import_with_options(load_hf: Callable, kind: str, src: Path, opts: ImportOptions) -> Imported:
    """``convert import`` of an MLLM format: ``load_hf`` (e.g. :func:`load_hf_llava`) with the command line's
    options, as a `kind` model."""
    model, cfg = load_hf(src, config=opts.config, seed=opts.seed, allow_nonfinite=opts.allow_nonfinite,
                         **opts.overrides())
    return Imported(kind, model, cfg, [])


def import_hf_llava(src: Path, opts: ImportOptions) -> Imported:
    """``convert import --format hf_llava``: :func:`load_hf_llava` with the command line's options."""
    return import_with_options(load_hf_llava, "llava", src, opts)


def export_source(source, src, out, opts: ExportOptions) -> Path:
    """``convert export --format hf_llava`` of an export source (``idmr_jax.weights.workdir.read_source``)."""
    return export_hf_llava(out, source.model_config, source.flat, kind=source.kind, dtype=opts.dtype,
                           src=str(src), log=log)
