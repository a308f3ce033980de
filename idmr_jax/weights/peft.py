"""LoRA adapters out to (and back in from) the PEFT 0.21 on-disk format.

A PEFT LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, whose tensors are
named ``base_model.model.<module path>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight`` ``[out, r]``
(PEFT strips the adapter name, e.g. ``.default``, when saving). Modules trained in full next to the adapter
(PEFT's ``modules_to_save``, e.g. a LLaVA projector) are stored as ``base_model.model.<module>.<param>``.
``PeftModel.from_pretrained(base_torch_model, folder)`` then reproduces the JAX model.

For transformers ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` the decoder's module path is ``model.`` (the default
`module_prefix`); for transformers 5 ``LlavaForConditionalGeneration`` (and the InternVL / Qwen2-VL classes) it is
``model.language_model.``: :func:`export_lm_lora_adapter` writes the adapters of those multimodal models.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from idmr_jax.models.decoder_lm import DecoderLMConfig
from idmr_jax.weights import torch_io
from idmr_jax.weights.decoder_lm import lora_rules, lora_target_modules
from idmr_jax.weights.mapping import NameMap, WeightMismatchError, flatten_params, unstack_from_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"


def adapter_config(lm_cfg: DecoderLMConfig, *, base_model_name_or_path: str = "", task_type: str | None = "CAUSAL_LM",
                   modules_to_save: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict of `lm_cfg.lora` (fields PEFT's ``LoraConfig`` reads; others default)."""
    lora = lm_cfg.lora
    if lora is None:
        raise ValueError("the decoder config has no LoRA (lm_cfg.lora is None)")
    targets = lora_target_modules(lm_cfg)
    if not targets:
        raise ValueError(f"LoRA targets {lora.targets} match no layer of the decoder")
    return {
        "peft_type": "LORA",
        "peft_version": PEFT_VERSION,
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": int(lora.rank),
        "lora_alpha": lora.alpha if float(lora.alpha) != int(lora.alpha) else int(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": targets,
        "bias": "none",
        "use_rslora": bool(lora.use_rslora),
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _lora_map(lm_cfg: DecoderLMConfig, module_prefix: str, lm_head: str, flax_prefix: str) -> NameMap:
    return NameMap(lora_rules(lm_cfg, module_prefix=module_prefix, lm_head=lm_head, peft_prefix=PEFT_PREFIX,
                              flax_prefix=flax_prefix))


def export_peft_adapter(lora_flat_params: Mapping[str, Any], lm_cfg: DecoderLMConfig, out_dir: str | os.PathLike, *,
                        module_prefix: str = "model.", base_model_name_or_path: str = "",
                        task_type: str | None = "CAUSAL_LM", lm_head: str = "lm_head", flax_prefix: str = "",
                        extra_tensors: Mapping[str, Any] | None = None,
                        modules_to_save: Sequence[str] | None = None, dtype: Any = None) -> Path:
    """Writes a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Args:
      lora_flat_params: flat params holding the LoRA factors (``layers/{i}/self_attn/q_proj/lora_a`` or the
        stacked ``layers/self_attn/q_proj/lora_a`` of a scanned model, under `flax_prefix`); other entries
        (base weights) are ignored, so ``flatten_params(model)`` works as it is.
      lm_cfg: the decoder config; ``lm_cfg.lora`` gives r, alpha, dropout and the targets.
      out_dir: created if needed (a local path: PEFT reads adapters from local folders or the hub).
      module_prefix: the decoder's module path in the torch model (``model.`` / ``model.language_model.``).
      extra_tensors: fully trained tensors with their torch names relative to the base model (e.g.
        ``model.multi_modal_projector.linear_1.weight``), saved as ``base_model.model.<name>``; list their
        modules in `modules_to_save` (PEFT matches them by name suffix, e.g. ``multi_modal_projector``).
      dtype: cast the tensors (e.g. ``np.float32``); None keeps the params' dtype.
    Returns the folder. Every LoRA factor the config implies must be present, and no other LoRA factor.
    """
    from safetensors.numpy import save_file

    name_map = _lora_map(lm_cfg, module_prefix, lm_head, flax_prefix)
    lora_flat = {k: np.asarray(v) for k, v in lora_flat_params.items()
                 if k.startswith(flax_prefix) and k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    tensors = name_map.flax_to_torch(unstack_from_model(lora_flat, name_map), source="LoRA params")
    if bool(extra_tensors) != bool(modules_to_save):
        raise ValueError("extra_tensors and modules_to_save go together (PEFT loads the tensors only for the "
                         "modules it wraps)")
    for name, value in (extra_tensors or {}).items():
        key = PEFT_PREFIX + name
        if key in tensors:
            raise WeightMismatchError(f"extra tensor {name!r} collides with a LoRA tensor")
        tensors[key] = np.asarray(value)
    if dtype is not None:
        tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    cfg = adapter_config(lm_cfg, base_model_name_or_path=base_model_name_or_path, task_type=task_type,
                         modules_to_save=modules_to_save)
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def export_lm_lora_adapter(model_or_flat: Any, lm_cfg: DecoderLMConfig, out_dir: str | os.PathLike, *,
                           lm_prefix: str, projector: tuple[NameMap, str] | None = None,
                           base_model_name_or_path: str = "") -> Path:
    """The LoRA adapter of a multimodal model's language model (flax params under ``lm/``) as a PEFT folder.

    `model_or_flat`: the embedder (an nnx Module) or its flat params. `lm_prefix`: the decoder's module path in the
    transformers model (``model.language_model.``). `projector`: (its NameMap from flax ``projector/`` params to
    torch names, the module name PEFT's ``modules_to_save`` matches) to also save the projector as a fully trained
    module; None: the adapter holds the LoRA factors only. ``target_modules`` becomes a regex restricted to the
    language model, since the vision towers have ``q_proj`` / ``k_proj`` / ``v_proj`` modules that short names
    would match too; ``lm_head`` sits outside the language model, at the top level, and is matched by its name.
    """
    if lm_cfg.lora is None:
        raise ValueError("the model has no LoRA on its language model (cfg.text.lora is None)")
    flat = flatten_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    extra = modules = None
    if projector is not None:
        name_map, module = projector
        extra = name_map.flax_to_torch({k: np.asarray(v) for k, v in flat.items() if k.startswith("projector/")})
        modules = [module]
    out = export_peft_adapter(flat, lm_cfg, out_dir, module_prefix=lm_prefix, flax_prefix="lm/",
                              base_model_name_or_path=base_model_name_or_path, task_type=None, extra_tensors=extra,
                              modules_to_save=modules)
    meta_path = Path(out) / ADAPTER_CONFIG
    meta = json.loads(meta_path.read_text())
    names = "|".join(n for n in meta["target_modules"] if n != "lm_head")
    pattern = rf".*{lm_prefix.rstrip('.')}\..*\.({names})" if names else ""
    if "lm_head" in meta["target_modules"]:
        pattern = f"{pattern}|lm_head" if pattern else "lm_head"
    meta["target_modules"] = pattern
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def import_peft_adapter(adapter_dir: str | os.PathLike, lm_cfg: DecoderLMConfig, *, module_prefix: str = "model.",
                        lm_head: str = "lm_head", flax_prefix: str = "") -> dict[str, np.ndarray]:
    """Reads a PEFT LoRA adapter folder into flat (unstacked) LoRA params for `lm_cfg`.

    The adapter's r / lora_alpha / use_rslora must equal ``lm_cfg.lora``'s (the scale lives in the config, not
    in the tensors); any tensor the map does not name (e.g. modules_to_save) raises. Load the result with
    ``mapping.load_partial(model, flat)``.
    """
    folder = Path(adapter_dir)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    lora = lm_cfg.lora
    if lora is None:
        raise ValueError("the decoder config has no LoRA (lm_cfg.lora is None)")
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type {meta.get('peft_type')!r}, expected 'LORA'")
    for key, want in (("r", lora.rank), ("lora_alpha", lora.alpha), ("use_rslora", lora.use_rslora)):
        if key in meta and meta[key] != want:
            raise ValueError(f"{folder / ADAPTER_CONFIG}: {key}={meta[key]!r}, the decoder config has {want!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if meta.get(key):
            raise ValueError(f"{folder / ADAPTER_CONFIG}: per-module {key} is not supported")
    name_map = _lora_map(lm_cfg, module_prefix, lm_head, flax_prefix)
    weights = folder / ADAPTER_WEIGHTS
    return name_map.torch_to_flax(torch_io.load_torch_state_dict(weights), source=str(weights))
