"""Name map and config conversion between transformers ``Qwen2VLForConditionalGeneration`` (5.23) and
:class:`idmr_jax.models.qwen2vl.Qwen2VLEmbedder` (format ``hf_qwen2vl``).

Checkpoints come in two layouts, told apart by their key prefixes (:func:`detect_layout`):

==========  ==========================  ===========  ================
layout      language model              lm head      vision tower
==========  ==========================  ===========  ================
"saved"     ``model.``                  ``lm_head``  ``visual.``
"module"    ``model.language_model.``   ``lm_head``  ``model.visual.``
==========  ==========================  ===========  ================

``save_pretrained`` of transformers 5.23 writes "saved" (the hub layout of the Qwen2-VL releases, which 5.23
renames on load); "module" is ``model.state_dict()`` in memory, and the module path PEFT adapters name.

* :func:`load_hf_qwen2vl`: a folder (config.json + safetensors / sharded index / ``pytorch_model.bin``) loaded
  strictly: a missing or unexpected tensor is an error naming it.
* :func:`export_hf_qwen2vl`: params -> ``model.safetensors`` + ``config.json`` in the "saved" layout, which
  ``Qwen2VLForConditionalGeneration.from_pretrained`` loads strictly. LoRA factors are merged into the kernels
  first; :func:`export_lora_adapter` writes them as a PEFT adapter instead.
* The parity check against transformers is :mod:`idmr_jax.weights.qwen2vl_verify`.

The reference's ``visual.merger`` is the embedder's ``projector/``; the rest of ``visual.*`` is ``vision/``, the
language model ``lm/``. The patch embedding's Conv3d weight ``[D, C, T, P, P]`` becomes a matmul kernel
``[C*T*P*P, D]`` (the patches are flattened in the same ``[C, T, P, P]`` order); the fused ``qkv`` weight
``[3D, D]`` a ``[D, 3, H, Dh]`` kernel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.models.qwen2vl import Qwen2VLConfig, Qwen2VLEmbedder
from idmr_jax.models.qwen2vl_vision import Qwen2VLVisionConfig
from idmr_jax.weights import decoder_lm, peft
from idmr_jax.weights.conversion import ExportOptions, Imported, ImportOptions, log
from idmr_jax.weights.llava import (activation_from_hf, activation_to_hf, import_with_options, load_hf_embedder,
                                    merged_state_dict, note_merged_lora, state_dict_to_flax, write_hf_checkpoint)
from idmr_jax.weights.mapping import (IDENTITY, LINEAR, NameMap, Rule, Transform, WeightMismatchError, per_layer,
                                      prefixed)
from idmr_jax.weights.torch_io import hf_config_as_dict
from idmr_jax.weights.vit import checked_reshape, linear_nd

LAYOUTS: dict[str, dict[str, str]] = {
    "saved": dict(lm="model.", lm_head="lm_head", vision="visual."),
    "module": dict(lm="model.language_model.", lm_head="lm_head", vision="model.visual."),
}
# The decoder's module path inside a (PEFT-wrapped) transformers 5 Qwen2VLForConditionalGeneration.
LM_MODULE_PREFIX = "model.language_model."
# transformers' defaults for fields a config.json may leave out.
DEFAULT_TEXT_THETA = 1_000_000.0
DEFAULT_MROPE_SECTION = (16, 24, 24)


def detect_layout(state_dict: Mapping[str, Any], *, source: str = "checkpoint") -> str:
    """The layout of a Qwen2-VL state dict (see the module docstring)."""
    keys = list(state_dict)
    if any(k.startswith("model.language_model.") or k.startswith("model.visual.") for k in keys):
        return "module"
    if any(k.startswith("visual.") for k in keys):
        return "saved"
    raise ValueError(f"{source}: not a Qwen2-VL checkpoint (no 'visual.*' or 'model.visual.*' tensors; "
                     f"e.g. {sorted(keys)[:4]})")


def conv3d_as_matmul(v: Qwen2VLVisionConfig) -> Transform:
    """torch Conv3d weight ``[D, C, T, P, P]`` <-> Flax kernel ``[C*T*P*P, D]``."""
    torch_shape = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    flax_shape = (v.patch_dim, v.embed_dim)

    def to_flax(x):
        if tuple(x.shape) != torch_shape:
            raise ValueError(f"expected patch_embed weight shape {torch_shape}, got {tuple(x.shape)}")
        return np.ascontiguousarray(x.reshape(v.embed_dim, -1).T)

    def to_torch(x):
        if tuple(x.shape) != flax_shape:
            raise ValueError(f"expected patch_embed kernel shape {flax_shape}, got {tuple(x.shape)}")
        return np.ascontiguousarray(x.T.reshape(torch_shape))

    return Transform(f"conv3d{torch_shape}->{flax_shape}", to_flax, to_torch)


def vision_rules(v: Qwen2VLVisionConfig) -> list[Rule]:
    """Rules of the vision tower (patch embedding and blocks), relative to it."""
    d, h, hd = v.embed_dim, v.num_heads, v.head_dim
    per = []
    for norm in ("norm1", "norm2"):
        per += [Rule(f"blocks.{{i}}.{norm}.weight", f"blocks/{{i}}/{norm}/scale"),
                Rule(f"blocks.{{i}}.{norm}.bias", f"blocks/{{i}}/{norm}/bias")]
    per += [Rule("blocks.{i}.attn.qkv.weight", "blocks/{i}/attn/qkv/kernel", linear_nd((d,), (3, h, hd))),
            Rule("blocks.{i}.attn.qkv.bias", "blocks/{i}/attn/qkv/bias", checked_reshape((3 * d,), (3, h, hd))),
            Rule("blocks.{i}.attn.proj.weight", "blocks/{i}/attn/proj/kernel", linear_nd((h, hd), (d,))),
            Rule("blocks.{i}.attn.proj.bias", "blocks/{i}/attn/proj/bias", IDENTITY)]
    for fc in ("fc1", "fc2"):
        per += [Rule(f"blocks.{{i}}.mlp.{fc}.weight", f"blocks/{{i}}/mlp/{fc}/kernel", LINEAR),
                Rule(f"blocks.{{i}}.mlp.{fc}.bias", f"blocks/{{i}}/mlp/{fc}/bias")]
    return [Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", conv3d_as_matmul(v)),
            *per_layer(per, range(v.depth))]


def merger_rules() -> list[Rule]:
    """Rules of the patch merger (torch ``merger.*`` inside the vision model; the embedder's ``projector``)."""
    rules = [Rule("ln_q.weight", "ln_q/scale"), Rule("ln_q.bias", "ln_q/bias")]
    for torch_name, flax_name in (("mlp.0", "fc1"), ("mlp.2", "fc2")):
        rules += [Rule(f"{torch_name}.weight", f"{flax_name}/kernel", LINEAR),
                  Rule(f"{torch_name}.bias", f"{flax_name}/bias")]
    return rules


def hf_qwen2vl_map(cfg: Qwen2VLConfig, layout: str = "saved") -> NameMap:
    """The full ``Qwen2VLForConditionalGeneration`` map in `layout` (base weights; LoRA factors excluded)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Qwen2-VL layout {layout!r}; known: {sorted(LAYOUTS)}")
    p = LAYOUTS[layout]
    return NameMap([
        *prefixed(vision_rules(cfg.vision), p["vision"], "vision/"),
        *prefixed(merger_rules(), p["vision"] + "merger.", "projector/"),
        *decoder_lm.decoder_lm_rules(cfg.text, prefix=p["lm"], lm_head=p["lm_head"], flax_prefix="lm/"),
    ])


# ----------------------------------------------------------------------------------------------
# transformers config <-> Qwen2VLConfig.


def _text_rope(t: Mapping[str, Any]) -> tuple[float, tuple[int, ...]]:
    """(rope_theta, mrope_section) of a text config (5.x ``rope_parameters`` or 4.x ``rope_scaling`` + theta)."""
    params = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"Qwen2-VL rope type {rope_type!r} is not implemented (only the default M-RoPE)")
    theta = params.get("rope_theta", t.get("rope_theta", DEFAULT_TEXT_THETA))
    return float(theta), tuple(int(s) for s in params.get("mrope_section", DEFAULT_MROPE_SECTION))


def qwen2vl_config_from_hf(hf_config: Any, **overrides) -> Qwen2VLConfig:
    """A :class:`Qwen2VLConfig` from a transformers ``Qwen2VLConfig`` (or its config.json dict, 5.x nested or
    4.x flat); `overrides` are Qwen2VLConfig fields (``pooling``, ``pooling_token_id``, ...)."""
    c = hf_config_as_dict(hf_config)
    if c.get("model_type") != "qwen2_vl":
        raise ValueError(f"expected a transformers Qwen2-VL config (model_type 'qwen2_vl'), "
                         f"got {c.get('model_type')!r}")
    v = dict(c.get("vision_config") or {})
    act = activation_from_hf(v.get("hidden_act", "quick_gelu"), "vision hidden_act")
    vision = Qwen2VLVisionConfig(
        depth=int(v.get("depth", 32)), embed_dim=int(v.get("embed_dim", 1280)),
        hidden_size=int(v.get("hidden_size", 3584)), mlp_ratio=float(v.get("mlp_ratio", 4)),
        num_heads=int(v.get("num_heads", 16)), in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", 14)), spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)), hidden_act=act,
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    t = dict(c.get("text_config") or c)  # transformers 4.x keeps the text fields at the top level
    theta, section = _text_rope(t)
    tie = bool(c.get("tie_word_embeddings") or t.get("tie_word_embeddings"))
    # Qwen2-VL's attention always uses hidden_size // num_heads as its head width (a head_dim field is ignored).
    text_dict = {**t, "model_type": "qwen2", "head_dim": None, "tie_word_embeddings": tie,
                 "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    text = decoder_lm.qwen2_config_from_hf(text_dict, mrope_section=section)
    kwargs = dict(vision=vision, text=text, image_token_id=int(c.get("image_token_id", 151655)),
                  video_token_id=c.get("video_token_id"), vision_start_token_id=c.get("vision_start_token_id"),
                  vision_end_token_id=c.get("vision_end_token_id"))
    return Qwen2VLConfig(**{**kwargs, **overrides})


def hf_qwen2vl_config_dict(cfg: Qwen2VLConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `cfg` (``Qwen2VLConfig.from_dict`` accepts it)."""
    t = cfg.text
    if t.family != "qwen2" or (t.head_dim is not None and t.head_dim != t.hidden_size // t.num_heads):
        raise ValueError("transformers' Qwen2-VL needs a Qwen2 text model with head_dim = hidden_size // num_heads")
    text = decoder_lm.hf_config_dict(t)
    text.pop("architectures", None)
    text.pop("head_dim", None)
    text.update(model_type="qwen2_vl_text", rope_parameters={
        "rope_type": "default", "mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta})
    v = cfg.vision
    ratio = int(v.mlp_ratio) if float(v.mlp_ratio).is_integer() else v.mlp_ratio
    vision = dict(model_type="qwen2_vl_vision", depth=v.depth, embed_dim=v.embed_dim, hidden_size=v.hidden_size,
                  mlp_ratio=ratio, num_heads=v.num_heads, in_channels=v.in_channels, patch_size=v.patch_size,
                  spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                  hidden_act=activation_to_hf(v.hidden_act),
                  rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    out = dict(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"], text_config=text,
               vision_config=vision, image_token_id=cfg.image_token_id, tie_word_embeddings=t.tie_word_embeddings)
    for name in ("video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if getattr(cfg, name) is not None:
            out[name] = getattr(cfg, name)
    return out


# ----------------------------------------------------------------------------------------------
# Load / export.


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: Qwen2VLConfig, *, source: str = "checkpoint"
                       ) -> tuple[dict[str, np.ndarray], str]:
    """(flat flax params, layout) of a transformers Qwen2-VL state dict; strict about missing / extra tensors."""
    layout = detect_layout(sd, source=source)
    return state_dict_to_flax(sd, cfg, hf_qwen2vl_map(cfg, layout), LAYOUTS[layout], source=source), layout


def load_hf_qwen2vl(src: str | os.PathLike, *, config: str | os.PathLike | None = None, seed: int = 0,
                    allow_nonfinite: bool = False, **overrides) -> tuple[Qwen2VLEmbedder, Qwen2VLConfig]:
    """A :class:`Qwen2VLEmbedder` with the weights of a transformers Qwen2-VL checkpoint, loaded strictly.

    `config`: the config.json (default: next to the weights). `overrides`: execution options for both towers
    (``dtype``, ``param_dtype``, ``precision``, ...), Qwen2VLConfig fields (``pooling``, ``pooling_token_id``) and
    ``lora`` (a :class:`~idmr_jax.models.lora.LoRAConfig` for the LM: fresh adapters, B = 0, outputs unchanged).
    """
    return load_hf_embedder(src, config=config, seed=seed, allow_nonfinite=allow_nonfinite, overrides=overrides,
                            config_from_hf=qwen2vl_config_from_hf, convert_state_dict=convert_state_dict,
                            embedder=Qwen2VLEmbedder)


def hf_state_dict(flat: Mapping[str, Any], cfg: Qwen2VLConfig, *, layout: str = "saved") -> dict[str, np.ndarray]:
    """transformers-named tensors of flat Qwen2VLEmbedder params (LoRA factors merged into the kernels)."""
    return merged_state_dict(flat, cfg.text.lora, hf_qwen2vl_map(cfg, layout))


def export_hf_qwen2vl(out: str | os.PathLike, cfg: Qwen2VLConfig, flat: Mapping[str, Any], *, kind: str = "qwen2vl",
                      dtype: str | None = None, src: str = "checkpoint", log=None) -> Path:
    """Writes Qwen2VLEmbedder params (`flat`, module layout) as ``out/model.safetensors`` + ``out/config.json`` in
    transformers' ``save_pretrained`` layout. `dtype` casts floating tensors; `log` receives notes."""
    if kind != "qwen2vl":
        raise WeightMismatchError(f"{src}: holds a {kind!r} model; hf_qwen2vl needs a qwen2vl model")
    note_merged_lora(flat, src=src, log=log, adapter_export="idmr_jax.weights.qwen2vl.export_lora_adapter")
    return write_hf_checkpoint(out, hf_state_dict(flat, cfg), hf_qwen2vl_config_dict(cfg), dtype)


def export_lora_adapter(model_or_flat: Any, cfg: Qwen2VLConfig, out_dir: str | os.PathLike, *,
                        include_projector: bool = False, base_model_name_or_path: str = "") -> Path:
    """The LM's LoRA adapter as a PEFT folder for ``Qwen2VLForConditionalGeneration`` (module prefix
    ``model.language_model.``). `include_projector` also saves the patch merger (the embedder's ``projector``,
    transformers' ``model.visual.merger``) as a fully trained module (PEFT ``modules_to_save``).
    ``target_modules`` is a regex restricted to the language model (and ``lm_head``), so that no vision module
    can match."""
    projector = (NameMap(prefixed(merger_rules(), "model.visual.merger.", "projector/")),
                 "merger") if include_projector else None
    return peft.export_lm_lora_adapter(model_or_flat, cfg.text, out_dir, lm_prefix=LM_MODULE_PREFIX,
                                       projector=projector, base_model_name_or_path=base_model_name_or_path)


def import_hf_qwen2vl(src: Path, opts: ImportOptions) -> Imported:
    """``convert import --format hf_qwen2vl``: :func:`load_hf_qwen2vl` with the command line's options."""
    return import_with_options(load_hf_qwen2vl, "qwen2vl", src, opts)


def export_source(source, src, out, opts: ExportOptions) -> Path:
    """``convert export --format hf_qwen2vl`` of an export source (``idmr_jax.weights.workdir.read_source``)."""
    return export_hf_qwen2vl(out, source.model_config, source.flat, kind=source.kind, dtype=opts.dtype,
                             src=str(src), log=log)
