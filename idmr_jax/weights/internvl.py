"""Name map and config conversion between transformers ``InternVLForConditionalGeneration`` and
:class:`idmr_jax.models.internvl.InternVLEmbedder` (InternViT + pixel shuffle + projector + Qwen2 / Llama decoder).

Checkpoints come in two layouts, told apart by their key prefixes (:func:`detect_layout`):

==========  ==============================  ===========================  =====================================
layout      language model                  lm head                      vision tower / projector
==========  ==============================  ===========================  =====================================
"saved"     ``language_model.model.``       ``language_model.lm_head``   ``vision_tower.`` /
                                                                         ``multi_modal_projector.``
"module"    ``model.language_model.``       ``lm_head``                  ``model.vision_tower.`` /
                                                                         ``model.multi_modal_projector.``
==========  ==============================  ===========================  =====================================

transformers 5.23's ``save_pretrained`` writes "saved" (it reverts its load-time renames); "module" is
``model.state_dict()`` in memory. ``from_pretrained`` reads both. The LM head is tied to the embedding when the
*top-level* ``tie_word_embeddings`` says so (True by default for this class, whatever the text config says); a
tied checkpoint holds no head.

Format ``hf_internvl``:

* :func:`load_hf_internvl`: a folder (config.json + safetensors / sharded index / ``pytorch_model.bin``) in either
  layout, loaded strictly (a missing or unknown tensor is an error naming it).
* :func:`export_hf_internvl`: params -> ``model.safetensors`` + ``config.json`` in the save_pretrained layout
  (LoRA factors merged into the kernels); :func:`export_lora_adapter` writes the LM's LoRA as a PEFT adapter.
* The parity check against transformers is :mod:`idmr_jax.weights.internvl_verify`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.models.internvl import InternVLConfig, InternVLEmbedder
from idmr_jax.weights import decoder_lm, peft
from idmr_jax.weights.conversion import ExportOptions, Imported, ImportOptions, log
from idmr_jax.weights.internvit import hf_vision_config_dict, internvit_config_from_hf, internvit_rules
from idmr_jax.weights.llava import (activation_from_hf, activation_to_hf, import_with_options, load_hf_embedder,
                                    merged_state_dict, note_merged_lora, state_dict_to_flax, write_hf_checkpoint)
from idmr_jax.weights.mapping import LINEAR, NameMap, Rule, WeightMismatchError, prefixed
from idmr_jax.weights.torch_io import hf_config_as_dict

KIND = "internvl"
LAYOUTS: dict[str, dict[str, str]] = {
    "saved": dict(lm="language_model.model.", lm_head="language_model.lm_head", vision="vision_tower.",
                  projector="multi_modal_projector."),
    "module": dict(lm="model.language_model.", lm_head="lm_head", vision="model.vision_tower.",
                   projector="model.multi_modal_projector."),
}
# The decoder's module path inside a (PEFT-wrapped) transformers 5 InternVLForConditionalGeneration.
LM_MODULE_PREFIX = "model.language_model."
PROJECTOR_MODULE = "model.multi_modal_projector."


def detect_layout(state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> str:
    """The layout of an InternVL state dict (see the module docstring)."""
    keys = list(state_dict)
    if any(k.startswith("model.language_model.") for k in keys):
        return "module"
    if any(k.startswith("language_model.model.") for k in keys):
        return "saved"
    raise ValueError(f"{source}: not an InternVL checkpoint (no 'language_model.model.*' or "
                     f"'model.language_model.*' tensors; e.g. {sorted(keys)[:4]})")


def projector_rules() -> list[Rule]:
    """Rules of the multimodal projector (LayerNorm, linear_1, linear_2), relative to it."""
    rules = [Rule("layer_norm.weight", "layer_norm/scale"), Rule("layer_norm.bias", "layer_norm/bias")]
    for name in ("linear_1", "linear_2"):
        rules += [Rule(f"{name}.weight", f"{name}/kernel", LINEAR), Rule(f"{name}.bias", f"{name}/bias")]
    return rules


def hf_internvl_map(cfg: InternVLConfig, layout: str = "saved") -> NameMap:
    """The full ``InternVLForConditionalGeneration`` map in `layout` (base weights; LoRA factors excluded)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown InternVL layout {layout!r}; known: {sorted(LAYOUTS)}")
    p = LAYOUTS[layout]
    return NameMap([
        *prefixed(internvit_rules(cfg.vision), p["vision"], "vision/"),
        *prefixed(projector_rules(), p["projector"], "projector/"),
        *decoder_lm.decoder_lm_rules(cfg.text, prefix=p["lm"], lm_head=p["lm_head"], flax_prefix="lm/"),
    ])


# ----------------------------------------------------------------------------------------------
# transformers config <-> InternVLConfig.

def internvl_config_from_hf(hf_config: Any, **overrides) -> InternVLConfig:
    """An :class:`InternVLConfig` from a transformers ``InternVLConfig`` (or its config.json dict); `overrides` are
    InternVLConfig fields (``pooling``, ...). Execution options go through :func:`idmr_jax.weights.llava.with_exec`."""
    c = hf_config_as_dict(hf_config)
    if c.get("model_type") != "internvl":
        raise ValueError(f"expected a transformers InternVL config (model_type 'internvl'), got "
                         f"{c.get('model_type')!r}")
    layer = c.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one int (InternVL indexes one hidden state), got {layer!r}")
    act = activation_from_hf(c.get("projector_hidden_act", "gelu"))
    # The head is tied by the top-level flag (the class default is True), not by the text config's.
    tie = bool(c.get("tie_word_embeddings", True))
    text = decoder_lm.config_from_hf({**dict(c.get("text_config") or {}), "tie_word_embeddings": tie})
    kwargs = dict(
        vision=internvit_config_from_hf(c.get("vision_config") or {}), text=text,
        image_token_id=int(c.get("image_token_id", 151667)), downsample_ratio=float(c.get("downsample_ratio", 0.5)),
        vision_feature_layer=layer, vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=act, image_seq_length=int(c.get("image_seq_length", 256)))
    return InternVLConfig(**{**kwargs, **overrides})


def hf_internvl_config_dict(cfg: InternVLConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `cfg` (``InternVLConfig.from_dict`` accepts it)."""
    text = decoder_lm.hf_config_dict(cfg.text)
    text.pop("architectures", None)
    return {
        "model_type": "internvl",
        "architectures": ["InternVLForConditionalGeneration"],
        "vision_config": hf_vision_config_dict(cfg.vision),
        "text_config": text,
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "downsample_ratio": cfg.downsample_ratio,
        "projector_hidden_act": activation_to_hf(cfg.projector_hidden_act),
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }


# ----------------------------------------------------------------------------------------------
# Load / export.


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: InternVLConfig, *, source: str = "checkpoint"
                       ) -> tuple[dict[str, np.ndarray], str]:
    """(flat flax params, layout) of a transformers InternVL state dict; strict about missing / extra tensors."""
    layout = detect_layout(sd, source=source)
    return state_dict_to_flax(sd, cfg, hf_internvl_map(cfg, layout), LAYOUTS[layout], source=source), layout


def load_hf_internvl(src: str | os.PathLike, *, config: str | os.PathLike | None = None, seed: int = 0,
                     allow_nonfinite: bool = False, **overrides) -> tuple[InternVLEmbedder, InternVLConfig]:
    """An :class:`InternVLEmbedder` with the weights of a transformers InternVL checkpoint, loaded strictly.

    `config`: the config.json (default: next to the weights). `overrides`: execution options for both towers
    (``dtype``, ``param_dtype``, ``remat``, ...), InternVLConfig fields (``pooling``, ...) and ``lora`` (a
    :class:`~idmr_jax.models.lora.LoRAConfig` for the LM: fresh adapters, B = 0, so the outputs are unchanged).
    """
    return load_hf_embedder(src, config=config, seed=seed, allow_nonfinite=allow_nonfinite, overrides=overrides,
                            config_from_hf=internvl_config_from_hf, convert_state_dict=convert_state_dict,
                            embedder=InternVLEmbedder)


def hf_state_dict(flat: Mapping[str, Any], cfg: InternVLConfig, *, layout: str = "saved") -> dict[str, np.ndarray]:
    """transformers-named tensors of flat InternVLEmbedder params (LoRA factors merged into the kernels)."""
    return merged_state_dict(flat, cfg.text.lora, hf_internvl_map(cfg, layout))


def export_hf_internvl(out: str | os.PathLike, cfg: InternVLConfig, flat: Mapping[str, Any], *, kind: str = KIND,
                       dtype: str | None = None, src: str = "checkpoint", log=None) -> Path:
    """Writes InternVLEmbedder params (`flat`, module layout) as ``out/model.safetensors`` + ``out/config.json``
    in transformers' save_pretrained layout. `dtype` casts floating tensors; `log` receives notes."""
    if kind != KIND:
        raise WeightMismatchError(f"{src}: holds a {kind!r} model; hf_internvl needs an internvl model")
    note_merged_lora(flat, src=src, log=log, adapter_export="idmr_jax.weights.internvl.export_lora_adapter")
    return write_hf_checkpoint(out, hf_state_dict(flat, cfg), hf_internvl_config_dict(cfg), dtype)


def export_lora_adapter(model_or_flat: Any, cfg: InternVLConfig, out_dir: str | os.PathLike, *,
                        include_projector: bool = False, base_model_name_or_path: str = "") -> Path:
    """The LM's LoRA adapter as a PEFT folder for ``InternVLForConditionalGeneration`` (module prefix
    ``model.language_model.``); `include_projector` also saves the projector in full (PEFT ``modules_to_save``).
    ``target_modules`` is a regex restricted to the language model: InternViT also has ``q_proj`` / ``k_proj`` /
    ``v_proj`` modules that short names would match."""
    projector = (NameMap(prefixed(projector_rules(), PROJECTOR_MODULE, "projector/")),
                 "multi_modal_projector") if include_projector else None
    return peft.export_lm_lora_adapter(model_or_flat, cfg.text, out_dir, lm_prefix=LM_MODULE_PREFIX,
                                       projector=projector, base_model_name_or_path=base_model_name_or_path)


def import_hf_internvl(src: Path, opts: ImportOptions) -> Imported:
    """``convert import --format hf_internvl``: :func:`load_hf_internvl` with the command line's options."""
    return import_with_options(load_hf_internvl, KIND, src, opts)


def export_source(source, src, out, opts: ExportOptions) -> Path:
    """``convert export --format hf_internvl`` of an export source (``idmr_jax.weights.workdir.read_source``)."""
    return export_hf_internvl(out, source.model_config, source.flat, kind=source.kind, dtype=opts.dtype,
                              src=str(src), log=log)

