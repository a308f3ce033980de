"""transformers ``LlavaForConditionalGeneration`` <-> :class:`idmr_jax.models.llava.LlavaEmbedder`: loading,
``convert import/export/verify --format hf_llava``, and LoRA adapter export for PEFT.

* :func:`load_hf_llava`: a folder (config.json + safetensors / sharded index / ``pytorch_model.bin`` read with
  ``weights_only=True``) in any layout of :mod:`idmr_jax.weights.llava_names`, loaded strictly.
* :func:`export_hf_llava`: LlavaEmbedder params -> ``model.safetensors`` (transformers' ``save_pretrained``
  layout) + ``config.json``. LoRA factors, if the checkpoint has them, are merged into the kernels first (the
  exported model then computes what the embedder computes); use :func:`export_lora_adapter` to keep them apart.
* :func:`verify`: transformers and the port on the same random inputs (image + text rows with right padding, the
  same with left padding, and a text-only batch); prints one line per output and returns the worst difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from idmr_jax.models import lora as lora_lib
from idmr_jax.models.llava import LlavaConfig, LlavaEmbedder
from idmr_jax.weights import io, llava_names
from idmr_jax.weights.mapping import (NameMap, WeightMismatchError, flatten_params, load_into, prefixed,
                                      unstack_from_model)

EXEC_FIELDS = ("dtype", "param_dtype", "scan", "remat", "precision")


def _with_exec(cfg: LlavaConfig, overrides: Mapping[str, Any]) -> LlavaConfig:
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


def _drop_tied_head(sd: dict, cfg: LlavaConfig, layout: str, source: str) -> dict:
    """A tied model's checkpoint may still hold the head: accept it only if it equals the embedding."""
    p = llava_names.LAYOUTS[layout]
    head, emb = f"{p['lm_head']}.weight", f"{p['lm']}embed_tokens.weight"
    if cfg.text.tie_word_embeddings and head in sd:
        if emb not in sd or not np.array_equal(np.asarray(sd[head]), np.asarray(sd[emb])):
            raise WeightMismatchError(f"{source}: the config ties the embeddings but {head!r} differs from {emb!r}")
        sd = {k: v for k, v in sd.items() if k != head}
    return sd


def convert_state_dict(sd: Mapping[str, np.ndarray], cfg: LlavaConfig, *, source: str = "checkpoint"
                       ) -> tuple[dict[str, np.ndarray], str]:
    """(flat flax params, layout) of a transformers LLaVA state dict; strict about missing / extra tensors."""
    layout = llava_names.detect_layout(sd, source=source)
    sd = _drop_tied_head(dict(sd), cfg, layout, source)
    flat = llava_names.hf_llava_map(cfg, layout).torch_to_flax(sd, source=source,
                                                               ignore=llava_names.HF_LLAVA_IGNORED)
    return flat, layout


def _base_filter(cfg: LlavaConfig):
    return nnx.All(nnx.Param, nnx.Not(lora_lib.lora_filter)) if cfg.text.lora is not None else nnx.Param


def load_hf_llava(src: str | os.PathLike, *, config: str | os.PathLike | None = None, seed: int = 0,
                  **overrides) -> tuple[LlavaEmbedder, LlavaConfig]:
    """A :class:`LlavaEmbedder` with the weights of a transformers LLaVA checkpoint, loaded strictly.

    `config`: the config.json (default: next to the weights). `overrides`: execution options for both towers
    (``dtype``, ``scan``, ...), LlavaConfig fields (``pooling``, ``pooling_token_id``, ...) and ``lora`` (a
    :class:`~idmr_jax.models.lora.LoRAConfig` for the LM: fresh adapters, B = 0, so the outputs are unchanged).
    """
    src = Path(src)
    cfg_dict = json.loads(Path(config).read_text()) if config else io.read_hf_config(src)
    if cfg_dict is None:
        raise FileNotFoundError(f"{src}: no config.json next to the weights (pass config=...)")
    cfg = _with_exec(llava_names.llava_config_from_hf(cfg_dict), overrides)
    flat, _ = convert_state_dict(io.load_torch_state_dict(src), cfg, source=str(src))
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
    name_map = llava_names.hf_llava_map(cfg, layout)
    return name_map.flax_to_torch(unstack_from_model(flat, name_map))


def export_hf_llava(out: str | os.PathLike, cfg: LlavaConfig, flat: Mapping[str, Any], *, kind: str = "llava",
                    dtype: str | None = None, src: str = "checkpoint", log=None) -> Path:
    """Writes LlavaEmbedder params (`flat`, module layout, e.g. ``io.restore_params`` of an ``import`` output or a
    training checkpoint) as ``out/model.safetensors`` + ``out/config.json`` in transformers' ``save_pretrained``
    layout. `dtype` casts floating tensors; `src` names the source in messages, `log` receives notes."""
    import ml_dtypes

    if kind != "llava":
        raise WeightMismatchError(f"{src}: holds a {kind!r} model; hf_llava needs a llava model")
    if any(lora_lib.is_lora_path(k) for k in flat) and log is not None:
        log(f"{src}: merging the LoRA factors into the LM kernels for the full-model export "
            "(llava_convert.export_lora_adapter writes them as a PEFT adapter instead)")
    sd = hf_state_dict(flat, cfg)
    if dtype:
        target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        sd = {k: v.astype(target) if io._is_float(v.dtype) else v for k, v in sd.items()}
    cfg_dict = llava_names.hf_llava_config_dict(cfg)
    if dtype:
        cfg_dict["dtype"] = dtype
    return io.save_torch_state_dict(sd, out, cfg_dict)


def export_lora_adapter(model_or_flat: Any, cfg: LlavaConfig, out_dir: str | os.PathLike, *,
                        include_projector: bool = False, base_model_name_or_path: str = "") -> Path:
    """The LM's LoRA adapter as a PEFT folder for ``LlavaForConditionalGeneration`` (module prefix
    ``model.language_model.``). `include_projector` also saves the projector as a fully trained module
    (PEFT ``modules_to_save``). The adapter's ``target_modules`` is a regex restricted to the language model:
    the CLIP tower also has ``q_proj`` / ``k_proj`` / ``v_proj`` modules that short names would match.
    """
    from idmr_jax.weights import peft_export

    if cfg.text.lora is None:
        raise ValueError("the LLaVA config has no LoRA on its language model (cfg.text.lora is None)")
    flat = flatten_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    extra = modules = None
    if include_projector:
        proj_map = NameMap(prefixed(llava_names.projector_rules(cfg), "model.multi_modal_projector.", "projector/"))
        extra = proj_map.flax_to_torch({k: np.asarray(v) for k, v in flat.items() if k.startswith("projector/")})
        modules = ["multi_modal_projector"]
    out = peft_export.export_peft_adapter(
        flat, cfg.text, out_dir, module_prefix=llava_names.LM_MODULE_PREFIX, flax_prefix="lm/",
        base_model_name_or_path=base_model_name_or_path, task_type=None, extra_tensors=extra,
        modules_to_save=modules)
    meta_path = Path(out) / peft_export.ADAPTER_CONFIG
    meta = json.loads(meta_path.read_text())
    names = "|".join(meta["target_modules"])
    meta["target_modules"] = rf".*{llava_names.LM_MODULE_PREFIX.rstrip('.')}\..*\.({names})"
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Verify.


def _torch_reference(src: Path):
    import transformers

    model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
        src, output_loading_info=True, dtype="float32")
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    if missing or info["unexpected_keys"] or info.get("mismatched_keys"):
        raise WeightMismatchError(f"{src}: transformers LlavaForConditionalGeneration: missing {missing[:8]}, "
                                  f"unexpected {list(info['unexpected_keys'])[:8]}, "
                                  f"mismatched {list(info.get('mismatched_keys') or [])[:8]}")
    return model.eval()


def verify_inputs(cfg: LlavaConfig, *, batch: int = 2, text_len: int = 6, seed: int = 0, padding: str = "right"):
    """(pixels NHWC, ids, mask) of a random batch: every row holds one image (its image tokens after a random
    1-token prefix, then random text); rows after the first are padded by a growing amount on `padding`'s side."""
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    n_img = cfg.image_tokens(cfg.vision.grid)
    length = 1 + n_img + text_len
    vocab = cfg.text.vocab_size
    ids = rng.integers(1, vocab, size=(batch, length)).astype(np.int64)
    ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % vocab
    mask = np.ones((batch, length), np.int64)
    for b in range(batch):
        n_pad = (b * (text_len - 1)) // max(batch - 1, 1)
        body = np.concatenate([ids[b, :1], np.full(n_img, cfg.image_token_id), ids[b, 1 + n_img:length - n_pad]])
        row = np.zeros(length, np.int64)
        row_mask = np.zeros(length, np.int64)
        sl = slice(0, len(body)) if padding == "right" else slice(length - len(body), length)
        row[sl], row_mask[sl] = body, 1
        ids[b], mask[b] = row, row_mask
    return pixels, ids, mask


def _last_attended(mask: np.ndarray) -> np.ndarray:
    return np.array([np.flatnonzero(m)[-1] for m in mask])


def _reference_outputs(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    import torch

    px = None if pixels is None else torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=px, attention_mask=torch.from_numpy(mask),
                    output_hidden_states=True)
    hidden = out.hidden_states[-1].numpy()
    rows = hidden[np.arange(len(ids)), _last_attended(mask)]
    pooled = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
    return dict(last_hidden_state=hidden, logits=out.logits.numpy(), embedding=pooled)


@nnx.jit
def _port_run(m: LlavaEmbedder, pixels, ids, mask):
    from idmr_jax.models import pooling

    hidden = m.hidden_states(ids, mask, pixels)
    # The embedder's own path when it pools the last token (what the reference does), else that pooling.
    emb = m.embed(ids, mask, pixels) if (m.cfg.pooling, m.cfg.normalize) == ("last", True) else \
        pooling.pool(hidden, mask, method="last")
    return dict(last_hidden_state=hidden, logits=m.lm.logits(hidden), embedding=emb)


def _port_outputs(model: LlavaEmbedder, pixels, ids, mask) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    px = None if pixels is None else jnp.asarray(pixels)
    out = _port_run(model, px, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def verify(src: str | os.PathLike, *, port: str | os.PathLike | None = None, dtype: str = "float32",
           batch: int = 2, text_len: int = 6, seed: int = 0, out=None) -> tuple[float, dict[str, float]]:
    """Compares transformers' ``LlavaForConditionalGeneration`` (from_pretrained of `src`, strict) with the port
    (converted from `src` in memory, or restored from `port`, an ``import`` output) on three batches: image+text
    right-padded, image+text left-padded, text only (right-padded). Hidden states and logits are compared on real
    (attended) positions; the embedding is the last-attended-token pooling, L2-normalised. Returns
    (max abs diff, {output: diff}); prints one line per output to `out` (stdout by default).
    """
    out = out or sys.stdout
    src = Path(src)
    ref_model = _torch_reference(src)
    if port is not None:
        kind, _ = io.load_model_config(port)
        if kind != "llava":
            raise WeightMismatchError(f"{port}: holds a {kind!r} model, not llava")
        _, saved = io.load_model_config(port)
        exec_cfg = _with_exec(saved, {"dtype": dtype})
        model, cfg = io.restore_model(port, overrides={"vision": exec_cfg.vision, "text": exec_cfg.text})
    else:
        model, cfg = load_hf_llava(src, dtype=dtype)

    cases = {}
    for padding in ("right", "left"):
        cases[f"image+text/{padding}"] = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed,
                                                       padding=padding)
    _, ids, mask = verify_inputs(cfg, batch=batch, text_len=text_len, seed=seed + 1)
    ids = np.where(ids == cfg.image_token_id, (cfg.image_token_id + 1) % cfg.text.vocab_size, ids)
    cases["text/right"] = (None, ids, mask)

    diffs: dict[str, float] = {}
    for case, (pixels, ids, mask) in cases.items():
        ref = _reference_outputs(ref_model, pixels, ids, mask)
        got = _port_outputs(model, pixels, ids, mask)
        valid = mask.astype(bool)
        for name, r in ref.items():
            g = got[name]
            if g.shape != r.shape:
                raise WeightMismatchError(f"verify: {name} has shape {g.shape} in the port, {r.shape} in torch")
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
            d = d[valid] if name != "embedding" else d
            key = f"{name}[{case}]"
            diffs[key] = float(np.max(d)) if np.isfinite(d).all() else float("nan")
            print(f"{key:36s} shape={tuple(r.shape)} max_abs_diff={diffs[key]:.3e}", file=out)
    out.flush()
    worst = max(diffs.values(), key=lambda v: float("inf") if np.isnan(v) else v)
    return worst, diffs
