"""Checkpoint conversion between PyTorch (transformers, LAVIS) and idmr_jax's Flax ports.

Usage::

    # PyTorch -> converted Flax checkpoint (DIR/model_config.json + DIR/params, see idmr_jax.weights.io)
    python -m idmr_jax.convert import --format hf_blip2       --src HF_FOLDER_OR_STATE_DICT --out DIR
    python -m idmr_jax.convert import --format lavis_blip2    --src blip2_pretrained.pth [--config CFG.json] --out DIR
    python -m idmr_jax.convert import --format hf_clip_vision --src CLIP_FOLDER --out DIR
    python -m idmr_jax.convert import --format hf_bert        --src BERT_FOLDER --out DIR \
        [--cross-attention-freq 2] [--encoder-hidden-size 1408]

    # converted Flax checkpoint, training workdir (its latest step) or WORKDIR/checkpoints/<step> -> PyTorch
    python -m idmr_jax.convert export --format hf_blip2    --src DIR --out HF_FOLDER   # Blip2ForImageTextRetrieval
    python -m idmr_jax.convert export --format lavis_blip2 --src DIR --out FOLDER      # FOLDER/model.safetensors
    python -m idmr_jax.convert export --format lavis_adafocal --src WORKDIR --out FOLDER  # official AdaFocal
    python -m idmr_jax.convert import --format lavis_adafocal --src FOLDER --out DIR      # and back

    # trained AdaFocal -> jax.export serving artifact (loaded by idmr_jax/serving.py, no flax needed)
    python -m idmr_jax.convert export --format jax_serving --src WORKDIR --out DIR [--platforms cpu,cuda,tpu]

    # numerical parity of the Flax port against transformers on the same checkpoint
    python -m idmr_jax.convert verify --format hf_blip2 --src HF_FOLDER [--port DIR] [--dtype bfloat16] [--tol X]

    # LLaVA (CLIP ViT + Qwen2 / Llama) embedder: transformers LlavaForConditionalGeneration <-> LlavaEmbedder
    python -m idmr_jax.convert import --format hf_llava --src LLAVA_FOLDER --out DIR
    python -m idmr_jax.convert export --format hf_llava --src DIR --out LLAVA_FOLDER
    python -m idmr_jax.convert verify --format hf_llava --src LLAVA_FOLDER [--port DIR]

Formats
    hf_blip2        transformers ``Blip2ForImageTextRetrieval`` (folder, or a state dict file with ``--config``
                    pointing at its config.json). Any other Blip2 class (``Blip2ForConditionalGeneration``,
                    ``Blip2Model``, ...) is imported as vision tower + query tokens + Q-Former; what that checkpoint
                    lacks (Q-Former text embeddings, projections, ITM head) is freshly initialised and listed.
    lavis_blip2     a LAVIS BLIP-2 state dict (.pth / .safetensors; ``{"model": ...}`` wrappers are unwrapped).
                    The architecture comes from ``--config`` (an idmr_jax ``model_config.json``, a bare Blip2Config
                    dict in the same form, or a transformers Blip2 config.json) or else is inferred from the
                    tensor shapes: every size is read off a shape except the two head counts, which shapes do not
                    determine: the ViT gets 16 heads at width 1408 (EVA ViT-g) and width // 64 otherwise, the
                    Q-Former hidden // 64 (BERT-base: 12). Pass ``--config`` for anything else.
    hf_clip_vision  transformers ``CLIPVisionModel`` folder (a full ``CLIPModel`` folder works too: its text tower
                    and projections are skipped) -> ViT (style "clip").
    hf_bert         transformers ``BertModel`` folder -> Q-Former with BLIP-2's bert-base initialisation: the
                    query FFN copies the text FFN, the cross-attention layers are fresh. BERT's token-type
                    embeddings and pooler are dropped. The learned query tokens are not part of a Q-Former
                    checkpoint (they belong to the BLIP-2 model), so there is no --num-query-tokens here.
    lavis_adafocal  an official AdaFocal state dict (see export); the architecture comes from ``--config`` or the
                    ``model_config.json`` an export leaves next to the weights, else from the tensor shapes (as
                    lavis_blip2; the CRM's 8 heads are the official constant). ``itm_head`` stays at init.
    hf_llava        transformers ``LlavaForConditionalGeneration`` folder (CLIP vision tower, Qwen2 or Llama text
                    model; the save_pretrained, llava-hf hub and in-memory key layouts) -> ``LlavaEmbedder``
                    (``idmr_jax.weights.llava_convert``). Export writes the save_pretrained layout; LoRA factors
                    are merged into the LM kernels (``llava_convert.export_lora_adapter`` writes a PEFT adapter).
                    Verify compares last hidden states, logits and the last-token embedding on image+text batches
                    (right and left padded) and a text-only batch, on real positions.

Export sources (--src): a converted model directory (``model_config.json`` + ``params/``, written by ``import``),
a training workdir of ``python -m idmr_jax.main`` (the latest step under ``checkpoints/``), or one step directory
``WORKDIR/checkpoints/<step>``. From a training checkpoint the model config is rebuilt from the saved training
config and only the params (trainable and frozen) are read, never the optimiser state
(``idmr_jax.weights.workdir``). ``hf_blip2`` / ``lavis_blip2`` of an AdaFocal model export its BLIP-2 part (the
CAAM params are listed and left out); a model whose vision encoder is not an EVA ViT (the demo's EfficientNet)
cannot be a BLIP-2 vision tower and is refused.

Export-only formats
    lavis_adafocal  the official AdaFocal (github HaHaJun1101/OACIR ``Blip2QformerOacirAdaFocal``; the vector-beta
                    and baseline classes for those configs): FOLDER/model.safetensors holds exactly its state
                    dict names and shapes, FOLDER/model_config.json the architecture (``import --format
                    lavis_adafocal`` reads it back bit-exactly). Official tensors the port does not train (the
                    Q-Former's BERT LM head ``Qformer.cls.*``, the ``position_ids`` buffer, the ``[DEC]`` row of a
                    30522-token vocabulary) get the documented values of ``idmr_jax.weights.adafocal_names``; the
                    port's ``itm_head`` has no official slot and is left out. Load with
                    ``model.load_state_dict(safetensors.torch.load_file(".../model.safetensors"))``.
    jax_serving     DIR/query.jaxexport and DIR/target.jaxexport (``jax.export``, symbolic batch), DIR/params.npz,
                    DIR/serving.json (input / output names, shapes, dtypes) and a copy of the loader
                    (``idmr_jax/serving.py``: ``query_fn, target_fn = serving.load(DIR)``).
                    ``--platforms`` (default cpu,cuda,tpu) lists where the artifact may run.

Exit codes: 0 success; 1 verify found a difference above the tolerance; 2 bad input (missing / unexpected /
misshapen tensors, unknown files): the message names the offending tensor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.weights import io
from idmr_jax.weights.mapping import NameMap, WeightMismatchError, load_into, prefixed, unstack_from_model

IMPORT_FORMATS = ("hf_blip2", "lavis_blip2", "hf_clip_vision", "hf_bert", "lavis_adafocal", "hf_llava")
EXPORT_FORMATS = ("hf_blip2", "lavis_blip2", "lavis_adafocal", "jax_serving", "hf_llava")
VERIFY_FORMATS = ("hf_blip2", "hf_llava")

# Default verify tolerances (max abs difference over all compared outputs). float32 is the project-wide parity
# bound. bfloat16 runs the port in bf16 compute (float32 params) against the float32 reference: bf16 keeps 8
# mantissa bits (relative step 2^-8 ~ 4e-3) and LayerNorm'd activations are O(1-10), so a few layers already
# reach 1e-2..1e-1; 0.25 is a sanity bound that still catches wrong weights (those give O(1) differences).
DEFAULT_TOL = {"float32": 1e-4, "bfloat16": 0.25}

# Non-persistent buffers that older transformers versions wrote into checkpoints; never weights.
_BUFFER_IGNORES = (r"(.*\.)?position_ids",)


class ConvertError(Exception):
    """A user-facing conversion error (bad paths, unsupported checkpoints)."""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Configs.


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise ConvertError(f"{path}: no such config file")
    return json.loads(path.read_text())


def _hf_config_dict(src: Path, config: str | None) -> dict:
    cfg = _read_json(config) if config else io.read_hf_config(src)
    if cfg is None:
        raise ConvertError(f"{src}: no config.json next to the weights; pass --config PATH/TO/config.json")
    return cfg


def _hf_blip2_config(cfg_dict: dict):
    import transformers

    if cfg_dict.get("model_type") != "blip-2":
        raise ConvertError(f"expected a transformers BLIP-2 config (model_type 'blip-2'), "
                           f"got model_type {cfg_dict.get('model_type')!r}")
    return transformers.Blip2Config.from_dict(cfg_dict)


def _overrides(args) -> dict:
    """Config fields set on the command line for every sub-config that has them (dtype, param_dtype)."""
    out = {}
    if getattr(args, "param_dtype", None):
        out["param_dtype"] = args.param_dtype
    return out


def _apply_overrides(config, overrides: Mapping[str, Any]):
    """Sets `overrides` on `config` and on every nested config dataclass that has those fields."""
    if not overrides:
        return config
    names = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in overrides.items() if k in names}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _apply_overrides(value, overrides)
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------------------------
# Loading converted params into modules.


def _load_partial(module, converted: Mapping[str, np.ndarray], *, source: str) -> list[str]:
    """Strictly loads `converted` (every tensor must land on a model param of the same shape) and keeps the
    module's fresh init for the params the checkpoint does not have. Returns the freshly initialised paths."""
    from idmr_jax.weights import blip2_names

    return blip2_names.load_partial(module, converted, source=source)


def _summarise_paths(paths: Sequence[str]) -> str:
    # Collapse per-layer paths so that "fresh cross-attention in 6 layers" reads as one line per kind.
    import re

    groups: dict[str, int] = {}
    for p in paths:
        key = re.sub(r"/\d+/", "/*/", p).rsplit("/", 1)[0]
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(sorted(groups))


# ----------------------------------------------------------------------------------------------
# Import.


def _build(kind: str, cfg, seed: int):
    return io.build_model(cfg, kind=kind, seed=seed)


def _import_hf_blip2(src: Path, args):
    from idmr_jax.weights import blip2_names

    cfg_dict = _hf_config_dict(src, args.config)
    hf_cfg = _hf_blip2_config(cfg_dict)
    cfg = _apply_overrides(blip2_names.blip2_config_from_hf(hf_cfg), _overrides(args))
    sd = io.load_torch_state_dict(src)
    archs = cfg_dict.get("architectures") or []
    module = _build("blip2", cfg, args.seed)
    # The architecture list decides; without one, the retrieval heads' presence does.
    retrieval = "Blip2ForImageTextRetrieval" in archs or (not archs and "itm_head.weight" in sd)
    if retrieval:
        name_map = blip2_names.hf_blip2_retrieval_map(cfg)
        flat = name_map.torch_to_flax(sd, source=str(src), ignore=_BUFFER_IGNORES)
        # transformers' retrieval model has no temperature: `temp` keeps its init (0.07) and nothing else may.
        fresh = _load_partial(module, flat, source=str(src))
        unexpected = sorted(set(fresh) - set(blip2_names.HF_RETRIEVAL_UNMAPPED))
        if unexpected:
            raise WeightMismatchError(f"{src}: the retrieval map left model params without a tensor: {unexpected[:8]}")
    else:
        # Generation checkpoints carry the Q-Former text path only with use_qformer_text_input=True.
        text_input = bool(getattr(hf_cfg, "use_qformer_text_input", False)) and "embeddings.word_embeddings.weight" in sd
        name_map = blip2_names.hf_blip2_parts_map(cfg, text_input=text_input)
        flat = name_map.torch_to_flax(sd, source=str(src),
                                      ignore=tuple(blip2_names.HF_BLIP2_IGNORED) + _BUFFER_IGNORES)
        fresh = _load_partial(module, flat, source=str(src))
        _log(f"{src}: {archs or 'unknown architecture'} is not Blip2ForImageTextRetrieval; imported the vision "
             f"tower, query tokens and Q-Former. Freshly initialised: {_summarise_paths(fresh)}")
    return "blip2", module, cfg, fresh


def _infer_lavis_config(sd: Mapping[str, np.ndarray]):
    """A Blip2Config read off LAVIS tensor shapes (head counts by convention; see the module docstring)."""
    from idmr_jax.models import blip2, qformer, vit

    def shape(name):
        if name not in sd:
            raise ConvertError(f"cannot infer the architecture: tensor {name!r} is missing (pass --config)")
        return sd[name].shape

    def count(prefix):
        idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    width = shape("visual_encoder.cls_token")[-1]
    patch = shape("visual_encoder.patch_embed.proj.weight")[-1]
    num_patches = shape("visual_encoder.pos_embed")[1] - 1
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ConvertError(f"visual_encoder.pos_embed has {num_patches} patch positions, not a square grid")
    vcfg = vit.vit_config("eva-g/14", width=width, depth=count("visual_encoder.blocks."),
                          num_heads=16 if width == 1408 else max(1, width // 64),
                          mlp_dim=shape("visual_encoder.blocks.0.mlp.fc1.weight")[0],
                          patch_size=patch, image_size=grid * patch,
                          qkv_bias="visual_encoder.blocks.0.attn.q_bias" in sd)
    q = "Qformer.bert."
    hidden = shape(q + "embeddings.word_embeddings.weight")[1]
    layers = count(q + "encoder.layer.")
    cross = sorted({int(k[len(q + "encoder.layer."):].split(".")[0]) for k in sd
                    if k.startswith(q + "encoder.layer.") and ".crossattention." in k})
    if not cross or cross[0] != 0:
        raise ConvertError("cannot infer cross_attention_freq: layer 0 has no crossattention tensors")
    freq = cross[1] - cross[0] if len(cross) > 1 else layers
    qcfg = qformer.QFormerConfig(
        hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
        intermediate_size=shape(q + "encoder.layer.0.intermediate.dense.weight")[0],
        cross_attention_freq=freq,
        encoder_hidden_size=shape(q + "encoder.layer.0.crossattention.self.key.weight")[1],
        vocab_size=shape(q + "embeddings.word_embeddings.weight")[0],
        max_position_embeddings=shape(q + "embeddings.position_embeddings.weight")[0])
    # LAVIS builds ln_vision with torch's default eps (1e-5), not the ViT's 1e-6.
    return blip2.Blip2Config(vision=vcfg, qformer=qcfg, num_query_tokens=shape("query_tokens")[1],
                             embed_dim=shape("vision_proj.weight")[0], ln_vision_eps=1e-5)


def _blip2_config_from_file(path: str):
    """--config for BLIP-2: an idmr_jax model_config.json, a bare Blip2Config dict, or a transformers config.json."""
    from idmr_jax.models import blip2
    from idmr_jax.weights import blip2_names

    data = _read_json(path)
    if "kind" in data and "config" in data:
        if data["kind"] != "blip2":
            raise ConvertError(f"{path}: describes a {data['kind']!r} model, not blip2")
        data = data["config"]
    if data.get("model_type") == "blip-2":
        return blip2_names.blip2_config_from_hf(_hf_blip2_config(data))
    return io.config_from_dict(blip2.Blip2Config, data)


def _import_lavis_blip2(src: Path, args):
    from idmr_jax.weights import blip2_names, vit_names

    sd = io.load_torch_state_dict(src)
    # `export --format lavis_blip2` leaves the architecture next to the weights: prefer it to guessing.
    beside = (src if src.is_dir() else src.parent) / io.MODEL_CONFIG_FILE
    if args.config:
        cfg = _blip2_config_from_file(args.config)
    elif beside.exists():
        cfg = _blip2_config_from_file(str(beside))
        _log(f"{src}: architecture from {beside}")
    else:
        cfg = _infer_lavis_config(sd)
        _log(f"{src}: architecture inferred from tensor shapes (pass --config to set it): "
             f"{json.dumps(io.config_to_dict(cfg))}")
    cfg = _apply_overrides(cfg, _overrides(args))
    # Some LAVIS checkpoints are saved without the frozen ViT (it is loaded from EVA's own file at build time).
    has_vision = any(k.startswith("visual_encoder.") for k in sd)
    if not has_vision and not args.allow_missing_vision:
        raise ConvertError(f"{src}: no visual_encoder.* tensors; pass --allow-missing-vision to import the rest "
                           f"and keep a freshly initialised ViT")
    name_map = blip2_names.lavis_blip2_map(cfg, include_vision=has_vision)
    # LAVIS keeps EVA's attention bias as a q_bias / v_bias pair; the port holds one fused qkv bias (k part 0).
    sd = vit_names.fuse_lavis_qv_bias(sd, prefix="visual_encoder.")
    flat = name_map.torch_to_flax(sd, source=str(src), ignore=tuple(blip2_names.LAVIS_BLIP2_IGNORED) + _BUFFER_IGNORES)
    module = _build("blip2", cfg, args.seed)
    if has_vision:
        load_into(module, flat, source=str(src))
        return "blip2", module, cfg, []
    fresh = _load_partial(module, flat, source=str(src))
    _log(f"{src}: freshly initialised: {_summarise_paths(fresh)}")
    return "blip2", module, cfg, fresh


def _import_hf_clip_vision(src: Path, args):
    import transformers

    from idmr_jax.weights import vit_names

    cfg_dict = _hf_config_dict(src, args.config)
    if cfg_dict.get("model_type") == "clip":
        hf_vision = transformers.CLIPConfig.from_dict(cfg_dict).vision_config
        ignore = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale")
    elif cfg_dict.get("model_type") == "clip_vision_model":
        hf_vision = transformers.CLIPVisionConfig.from_dict(cfg_dict)
        ignore = (r"visual_projection\..*",)  # CLIPVisionModelWithProjection
    else:
        raise ConvertError(f"{src}: expected a CLIP config (model_type 'clip_vision_model' or 'clip'), "
                           f"got {cfg_dict.get('model_type')!r}")
    cfg = _apply_overrides(vit_names.vit_config_from_hf(hf_vision), _overrides(args))
    sd = io.load_torch_state_dict(src)
    # Hub CLIP checkpoints (and CLIPModel) nest the tower under `vision_model.`; transformers 5 saves a
    # CLIPVisionModel without that prefix.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    name_map = NameMap(prefixed(vit_names.hf_clip_vision_rules(cfg), prefix))
    flat = name_map.torch_to_flax(sd, source=str(src), ignore=ignore + _BUFFER_IGNORES)
    module = _build("vit", cfg, args.seed)
    load_into(module, flat, source=str(src))
    return "vit", module, cfg, []


def _import_hf_bert(src: Path, args):
    from idmr_jax.models.qformer import QFormerConfig
    from idmr_jax.weights import blip2_names

    bert = _hf_config_dict(src, args.config)
    if bert.get("model_type") != "bert":
        raise ConvertError(f"{src}: expected a BERT config (model_type 'bert'), got {bert.get('model_type')!r}")
    cfg = QFormerConfig(
        hidden_size=bert["hidden_size"], num_layers=bert["num_hidden_layers"], num_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"], cross_attention_freq=args.cross_attention_freq,
        encoder_hidden_size=args.encoder_hidden_size, vocab_size=bert["vocab_size"],
        max_position_embeddings=bert["max_position_embeddings"], layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        pad_token_id=bert.get("pad_token_id", 0) or 0, hidden_act=bert.get("hidden_act", "gelu"))
    cfg = _apply_overrides(cfg, _overrides(args))
    sd = io.load_torch_state_dict(src)
    flat, _ = blip2_names.qformer_from_bert(sd, cfg)
    module = _build("qformer", cfg, args.seed)
    fresh = _load_partial(module, flat, source=str(src))
    _log(f"{src}: BERT -> Q-Former; freshly initialised: {_summarise_paths(fresh)}")
    return "qformer", module, cfg, fresh


def _import_lavis_adafocal(src: Path, args):
    from idmr_jax.models.adafocal import AdaFocalConfig
    from idmr_jax.weights import adafocal_names, workdir

    sd = io.load_torch_state_dict(src)
    beside = (src if src.is_dir() else src.parent) / io.MODEL_CONFIG_FILE
    config_file = args.config or (str(beside) if beside.exists() else None)
    dec_row = False
    if config_file:
        data = json.loads(Path(config_file).read_text())
        if data.get("kind") != "adafocal":
            raise ConvertError(f"{config_file}: not an AdaFocal model_config.json (kind {data.get('kind')!r})")
        cfg = io.config_from_dict(AdaFocalConfig, data["config"])
        dec_row = bool(data.get("lavis_adafocal", {}).get("dec_row_appended", False))
        _log(f"{src}: architecture from {config_file}")
    else:
        cfg = adafocal_names.infer_config(sd, _infer_lavis_config(sd))
        _log(f"{src}: architecture inferred from tensor shapes (pass --config to set it): "
             f"{json.dumps(io.config_to_dict(cfg))}")
    cfg = _apply_overrides(cfg, _overrides(args))
    try:
        flat = adafocal_names.from_official_state_dict(sd, cfg, dec_row_appended=dec_row, source=str(src))
    except ValueError as e:
        raise ConvertError(str(e)) from e
    # Built around the converted params (no full random init first); only itm_head is initialised.
    fresh = sorted(adafocal_names.UNMAPPED)
    module = workdir.load_module("adafocal", cfg, flat, seed=args.seed, source=str(src), fresh=fresh)
    _log(f"{src}: freshly initialised (no official counterpart): {_summarise_paths(fresh)}")
    return "adafocal", module, cfg, fresh


def _import_hf_llava(src: Path, args):
    from idmr_jax.weights import llava_convert

    model, cfg = llava_convert.load_hf_llava(src, config=args.config, seed=args.seed, **_overrides(args))
    return "llava", model, cfg, []


_IMPORTERS = {"hf_blip2": _import_hf_blip2, "lavis_blip2": _import_lavis_blip2,
              "hf_clip_vision": _import_hf_clip_vision, "hf_bert": _import_hf_bert,
              "lavis_adafocal": _import_lavis_adafocal, "hf_llava": _import_hf_llava}


def import_checkpoint(fmt: str, src: str | Path, out: str | Path, args: argparse.Namespace | None = None) -> Path:
    """Converts a PyTorch checkpoint of format `fmt` to an idmr_jax checkpoint directory `out`."""
    args = args or _parser().parse_args(["import", "--format", fmt, "--src", str(src), "--out", str(out)])
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    kind, module, cfg, fresh = _IMPORTERS[fmt](src, args)
    extra = {"format": fmt, "path": str(src.absolute()), "freshly_initialised": fresh}
    return io.save_model(out, module, cfg, kind=kind, extra=extra)


# ----------------------------------------------------------------------------------------------
# Export.


def _cast(sd: dict[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    if not dtype:
        return sd
    import ml_dtypes

    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return {k: v.astype(target) if io._is_float(v.dtype) else v for k, v in sd.items()}


def export_checkpoint(fmt: str, src: str | Path, out: str | Path, *, dtype: str | None = None,
                      drop_k_bias: bool = False, platforms: Sequence[str] | None = None) -> Path:
    """Writes the model of `src` (a converted model directory, a training workdir or one of its checkpoint steps;
    see the module docstring) in format `fmt` under folder `out`.

    hf_blip2: ``model.safetensors`` + ``config.json`` of a ``Blip2ForImageTextRetrieval`` (``temp`` is dropped:
    that class has no temperature). lavis_blip2: LAVIS-named ``model.safetensors`` plus ``model_config.json``
    (LAVIS has no config file; ``import`` picks it up). LAVIS has no key bias in EVA attention: a nonzero k part of
    a fused qkv bias is an error unless `drop_k_bias` (exact: a key bias shifts all logits of a query equally).
    lavis_adafocal / jax_serving: see :func:`_export_lavis_adafocal` / :func:`_export_jax_serving`.
    `platforms`: jax_serving only.
    """
    from idmr_jax.weights import blip2_names, vit_names, workdir

    try:
        source = workdir.read_source(src)
    except ValueError as e:  # e.g. a training config of another task, or one that does not match its params
        raise ConvertError(f"{src}: {e}") from e
    if fmt == "hf_llava":
        from idmr_jax.weights import llava_convert

        return llava_convert.export_hf_llava(out, source.model_config, source.flat, kind=source.kind, dtype=dtype,
                                             src=str(src), log=_log)
    if fmt == "lavis_adafocal":
        return _export_lavis_adafocal(source, src, out, dtype=dtype, drop_k_bias=drop_k_bias)
    if fmt == "jax_serving":
        if dtype:
            raise ConvertError("--dtype applies to the PyTorch formats; jax_serving keeps the trained param dtypes")
        return _export_jax_serving(source, src, out, platforms=platforms)
    cfg, flat = _blip2_part(source, src, fmt)
    flat = unstack_from_model(flat, _probe_map(cfg))
    if fmt == "hf_blip2":
        name_map = blip2_names.hf_blip2_retrieval_map(cfg)
        hf_cfg = blip2_names.hf_blip2_config(cfg)
        cfg_dict = hf_cfg.to_dict()
        cfg_dict["architectures"] = ["Blip2ForImageTextRetrieval"]
        if cfg.ln_vision_eps is not None and cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
            # transformers' post_layernorm (= ln_vision) takes the ViT's eps; the exported model will use that.
            _log(f"warning: ln_vision_eps={cfg.ln_vision_eps} has no place in a transformers config; the exported "
                 f"model uses the ViT's layer_norm_eps={cfg.vision.layer_norm_eps} for post_layernorm")
        # transformers' retrieval model has no temperature parameter.
        skipped = sorted(k for k in flat if k in set(blip2_names.HF_RETRIEVAL_UNMAPPED))
        if skipped:
            _log(f"hf_blip2 has no tensor for {skipped}; not exported")
        flat = {k: v for k, v in flat.items() if k not in skipped}
    else:
        name_map = blip2_names.lavis_blip2_map(cfg)
        cfg_dict = None
    sd = name_map.flax_to_torch(flat, source=str(src))
    if fmt == "lavis_blip2":
        sd = vit_names.split_lavis_qkv_bias(sd, prefix="visual_encoder.", drop_k_bias=drop_k_bias)
    sd = _cast(sd, dtype)
    path = io.save_torch_state_dict(sd, out, cfg_dict)
    if fmt == "lavis_blip2":
        # LAVIS has no config.json; keep the architecture next to the weights so that a re-import needs no guess.
        (Path(out) / io.MODEL_CONFIG_FILE).write_text(
            json.dumps({"format_version": io.FORMAT_VERSION, "kind": "blip2", "config": io.config_to_dict(cfg)},
                       indent=2) + "\n")
    return path


def _blip2_part(source, src, fmt: str):
    """(Blip2Config, flat BLIP-2 params) of a blip2 model, or of the BLIP-2 inside an AdaFocal model."""
    from idmr_jax.models.vit import ViTConfig

    cfg, flat = source.model_config, source.flat
    if source.kind == "adafocal":
        rest = sorted(k for k in flat if not k.startswith("blip2/"))
        _log(f"{src}: exporting the BLIP-2 of an AdaFocal model; {fmt} has no place for the CAAM params "
             f"({_summarise_paths(rest)}); itm_head is exported as it is (AdaFocal does not train it)")
        cfg, flat = cfg.blip2, {k[len("blip2/"):]: v for k, v in flat.items() if k.startswith("blip2/")}
    elif source.kind != "blip2":
        raise ConvertError(f"{src}: holds a {source.kind!r} model; {fmt} needs a BLIP-2 or AdaFocal model")
    vision = cfg.vision
    if not isinstance(vision, ViTConfig) or vision.style != "eva":
        what = f"a {vision.style!r}-style ViT" if isinstance(vision, ViTConfig) else \
            f"an {type(vision).__name__} (kind 'efficientnet', the demo config)"
        raise ConvertError(f"{src}: the vision encoder is {what}; {fmt} holds an EVA ViT (transformers "
                           f"Blip2VisionModel / LAVIS eva_vit), so this model cannot be exported as {fmt}")
    return cfg, flat


def _require_adafocal(source, src, fmt: str) -> None:
    if source.kind != "adafocal":
        raise ConvertError(f"{src}: holds a {source.kind!r} model; {fmt} needs an AdaFocal model (a training "
                           f"workdir, one of its checkpoints, or an `import --format lavis_adafocal` output)")


def _export_lavis_adafocal(source, src, out, *, dtype: str | None, drop_k_bias: bool) -> Path:
    """The official AdaFocal state dict (``idmr_jax.weights.adafocal_names``) + ``model_config.json``."""
    from idmr_jax.weights import adafocal_names

    _require_adafocal(source, src, "lavis_adafocal")
    cfg = source.model_config
    try:
        name_map = adafocal_names.lavis_adafocal_map(cfg)
    except ValueError as e:
        raise ConvertError(f"{src}: {e}") from e
    flat = unstack_from_model(source.flat, name_map)
    sd, notes = adafocal_names.to_official_state_dict(flat, cfg, drop_k_bias=drop_k_bias, source=str(src))
    cls = adafocal_names.official_class(cfg)
    _log(f"lavis_adafocal ({cls}): left out (no official counterpart): {notes['dropped']}")
    _log(f"lavis_adafocal: not trained by this port, written with documented values "
         f"(idmr_jax.weights.adafocal_names): {notes['untrained']}")
    if notes["dec_row_appended"]:
        _log(f"lavis_adafocal: the Q-Former vocabulary has bert-base's {cfg.blip2.qformer.vocab_size} tokens; "
             f"appended LAVIS' [DEC] row (zeros, never read by AdaFocal)")
    eps = cfg.blip2.ln_vision_eps if cfg.blip2.ln_vision_eps is not None else cfg.blip2.vision.layer_norm_eps
    if eps != 1e-5:
        _log(f"note: the official ln_vision is a torch LayerNorm with eps 1e-5; this model used {eps}")
    path = io.save_torch_state_dict(_cast(sd, dtype), out)
    meta = {"format_version": io.FORMAT_VERSION, "kind": "adafocal", "config": io.config_to_dict(cfg),
            "lavis_adafocal": {"official_class": cls, **notes}, "source": source.provenance}
    (Path(out) / io.MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _export_jax_serving(source, src, out, *, platforms: Sequence[str] | None) -> Path:
    """``jax.export`` query / target functions + params (``idmr_jax.serving_export``)."""
    from idmr_jax import serving_export
    from idmr_jax.weights import workdir

    _require_adafocal(source, src, "jax_serving")
    if unknown := sorted(set(platforms or ()) - set(serving_export.PLATFORMS)):
        raise ConvertError(f"--platforms: unknown {unknown}; use some of {', '.join(serving_export.PLATFORMS)}")
    module = workdir.load_module(source.kind, source.model_config, source.flat, source=str(src))
    return serving_export.export(module, out, platforms=platforms, provenance=source.provenance,
                                 max_text_len=source.max_text_len)


def _probe_map(cfg) -> NameMap:
    """The per-layer flax paths of a BLIP-2 (LAVIS map: it covers every param), to unstack scanned layers."""
    from idmr_jax.weights import blip2_names

    return blip2_names.lavis_blip2_map(cfg)


# ----------------------------------------------------------------------------------------------
# Verify.


def _numpy_to_torch(a: np.ndarray):
    import ml_dtypes
    import torch

    a = np.asarray(a, order="C")  # not ascontiguousarray, which makes 0-d tensors 1-d
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _torch_blip2(cfg_dict: dict, sd: Mapping[str, np.ndarray], src: Path):
    """The transformers reference built from config + the very same tensors (strict load, float32)."""
    import torch
    import transformers

    hf_cfg = _hf_blip2_config(cfg_dict)
    model = transformers.Blip2ForImageTextRetrieval(hf_cfg)
    tensors = {k: _numpy_to_torch(v) for k, v in sd.items()}
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise WeightMismatchError(f"{src}: transformers Blip2ForImageTextRetrieval: missing {missing[:8]}, "
                                  f"unexpected {list(result.unexpected_keys)[:8]}")
    return model.float().eval(), hf_cfg


def _random_inputs(hf_cfg, batch: int, text_len: int, seed: int):
    rng = np.random.default_rng(seed)
    size = hf_cfg.vision_config.image_size
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)  # NHWC
    vocab = hf_cfg.qformer_config.vocab_size
    pad = hf_cfg.qformer_config.pad_token_id or 0
    ids = rng.integers(1, vocab, size=(batch, text_len)).astype(np.int64)
    ids[ids == pad] = (pad + 1) % vocab
    mask = np.ones((batch, text_len), np.int64)
    # Right padding of a growing length on every row but the first (the [CLS] at 0 always stays real).
    for b in range(1, batch):
        n_pad = max(1, (b * (text_len - 1)) // batch)
        mask[b, text_len - n_pad:] = 0
    ids[mask == 0] = pad
    return pixels, ids, mask


def _reference_outputs(model, pixels, ids, mask) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        image = model.vision_model(pixel_values=px).last_hidden_state  # post_layernorm == LAVIS ln_vision
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long)
        queries = model.query_tokens.expand(image.shape[0], -1, -1)
        nq = queries.shape[1]
        q_img = model.qformer(query_embeds=queries, encoder_hidden_states=image,
                              encoder_attention_mask=image_mask).last_hidden_state
        emb = model.embeddings(input_ids=ids_t, query_embeds=queries)
        full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), mask_t], dim=1)
        q_it = model.qformer(query_embeds=emb, query_length=nq, attention_mask=full_mask,
                             encoder_hidden_states=image, encoder_attention_mask=image_mask).last_hidden_state
        q_txt = model.qformer(query_embeds=model.embeddings(input_ids=ids_t), query_length=0,
                              attention_mask=mask_t).last_hidden_state
        img_feat = F.normalize(model.vision_projection(q_img), dim=-1)
        txt_feat = F.normalize(model.text_projection(q_txt[:, 0]), dim=-1)
        itm = model.itm_head(q_it[:, :nq]).mean(dim=1)
    return {k: v.numpy() for k, v in dict(vision_tokens=image, qformer_image=q_img, qformer_image_text=q_it,
                                            qformer_text=q_txt, image_features=img_feat, text_features=txt_feat,
                                            itm_logits=itm).items()}


def _port_outputs(module, pixels, ids, mask) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @nnx.jit
    def run(m, pixels, ids, mask):
        image, _ = m.encode_image(pixels)
        batch = image.shape[0]
        queries = jnp.broadcast_to(m.query_tokens[...], (batch, *m.query_tokens.shape[-2:]))
        q_img = m.qformer(query_embeds=queries, image_embeds=image).last_hidden_state
        q_it = m.multimodal_hidden(image, ids, mask)
        q_it = getattr(q_it, "last_hidden_state", q_it)
        q_txt = m.qformer(input_ids=ids, attention_mask=mask).last_hidden_state
        nq = queries.shape[1]
        return dict(vision_tokens=image, qformer_image=q_img, qformer_image_text=q_it, qformer_text=q_txt,
                    image_features=m.image_features(image), text_features=m.text_features(ids, mask),
                    itm_logits=m.itm_head(q_it[:, :nq]).mean(axis=1))

    out = run(module, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    return {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}


def verify(src: str | Path, *, port: str | Path | None = None, dtype: str = "float32", tol: float | None = None,
           config: str | None = None, batch: int = 2, text_len: int = 8, seed: int = 0,
           out=None) -> tuple[float, dict[str, float]]:
    """Runs transformers and the Flax port on the same random inputs; returns (max abs diff, per output).

    The reference is ``Blip2ForImageTextRetrieval`` loaded strictly from `src`. The port is converted from the same
    tensors, or restored from `port` (an ``import`` output) to check a conversion. The text has right padding
    (attention mask zeros) on all rows but the first. All positions are compared, padded ones included (both
    implementations mask padded *keys* only, so padded positions are well defined); the lines of the text
    outputs also show the difference over real positions alone.
    """
    out = out or sys.stdout  # looked up per call: tests (and callers) may have redirected it
    src = Path(src)
    cfg_dict = _hf_config_dict(src, config)
    sd = io.load_torch_state_dict(src)
    model, hf_cfg = _torch_blip2(cfg_dict, sd, src)
    overrides = {"dtype": dtype}
    if port is not None:
        kind, _ = io.load_model_config(port)
        if kind != "blip2":
            raise ConvertError(f"{port}: holds a {kind!r} model, not blip2")
        module, _ = _rebuild_with(port, overrides)
    else:
        from idmr_jax.weights import blip2_names

        cfg = _apply_overrides(blip2_names.blip2_config_from_hf(hf_cfg), overrides)
        module = _build("blip2", cfg, seed)
        _load_partial(module, blip2_names.hf_blip2_retrieval_map(cfg).torch_to_flax(
            sd, source=str(src), ignore=_BUFFER_IGNORES), source=str(src))

    pixels, ids, mask = _random_inputs(hf_cfg, batch, text_len, seed)
    ref = _reference_outputs(model, pixels, ids, mask)
    got = _port_outputs(module, pixels, ids, mask)
    nq = hf_cfg.num_query_tokens
    valid_it = np.concatenate([np.ones((batch, nq), bool), mask.astype(bool)], axis=1)
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    diffs = {}
    for name, r in ref.items():
        g = got[name]
        if g.shape != r.shape:
            raise WeightMismatchError(f"verify: output {name} has shape {g.shape} in the port, {r.shape} in torch")
        d = np.abs(g.astype(np.float64) - r.astype(np.float64))
        diffs[name] = float(d.max())
        line = f"{name:20s} shape={tuple(r.shape)} max_abs_diff={diffs[name]:.3e}"
        if name in ("qformer_image_text", "qformer_text"):
            valid = valid_it if name == "qformer_image_text" else mask.astype(bool)
            line += f" (unpadded positions: {float(d[valid].max()):.3e})"
        print(line, file=out)
    out.flush()
    return max(diffs.values()), diffs


def _rebuild_with(port, overrides):
    """Restores `port` with config overrides applied to every sub-config that has the field (e.g. dtype)."""
    kind, cfg = io.load_model_config(port)
    new = _apply_overrides(cfg, overrides)
    top = {f.name: getattr(new, f.name) for f in dataclasses.fields(new)
           if getattr(new, f.name) != getattr(cfg, f.name)}
    return io.restore_model(port, overrides=top)


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m idmr_jax.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="PyTorch checkpoint -> idmr_jax (Orbax) checkpoint directory")
    imp.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    imp.add_argument("--src", required=True, help="checkpoint folder or state dict file")
    imp.add_argument("--out", required=True, help="output directory (model_config.json + params/)")
    imp.add_argument("--config", help="config JSON: transformers config.json for a bare state dict; "
                                      "for lavis_blip2 an idmr_jax/transformers BLIP-2 config (else inferred)")
    imp.add_argument("--param-dtype", choices=("float32", "bfloat16"), help="dtype the params are stored in "
                     "(default: the model config's, float32)")
    imp.add_argument("--cross-attention-freq", type=int, default=2, help="hf_bert: cross-attention every N layers")
    imp.add_argument("--encoder-hidden-size", type=int, default=1408,
                     help="hf_bert: width of the image tokens (1408 = EVA ViT-g)")
    imp.add_argument("--allow-missing-vision", action="store_true",
                     help="lavis_blip2: accept a checkpoint without visual_encoder.* (the ViT stays at init)")
    imp.add_argument("--seed", type=int, default=0, help="seed of freshly initialised params")

    exp = sub.add_parser("export", help="idmr_jax checkpoint directory -> PyTorch checkpoint folder")
    exp.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    exp.add_argument("--src", required=True, help="directory written by `import`, a training workdir, or "
                                                  "WORKDIR/checkpoints/<step>")
    exp.add_argument("--out", required=True, help="output folder (model.safetensors [+ config.json])")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast floating tensors")
    exp.add_argument("--drop-k-bias", action="store_true",
                     help="lavis_blip2 / lavis_adafocal: drop a nonzero EVA key bias (LAVIS has none; outputs "
                          "are unchanged)")
    exp.add_argument("--platforms", type=lambda s: tuple(filter(None, s.split(","))),
                     help="jax_serving: comma-separated platforms to export for (default cpu,cuda,tpu)")

    ver = sub.add_parser("verify", help="parity of the Flax port against transformers on the same checkpoint")
    ver.add_argument("--format", required=True, choices=VERIFY_FORMATS)
    ver.add_argument("--src", required=True, help="transformers Blip2ForImageTextRetrieval folder or state dict")
    ver.add_argument("--config", help="transformers config.json, if --src is a bare state dict")
    ver.add_argument("--port", help="compare an `import` output directory instead of converting --src in memory")
    ver.add_argument("--dtype", choices=tuple(DEFAULT_TOL), default="float32", help="compute dtype of the port")
    ver.add_argument("--tol", type=float, help=f"max abs diff allowed (default {DEFAULT_TOL})")
    ver.add_argument("--batch", type=int, default=2)
    ver.add_argument("--text-len", type=int, default=8)
    ver.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 verify above tolerance, 2 bad input)."""
    args = _parser().parse_args(argv)
    t0 = time.time()
    try:
        if args.command == "import":
            out = import_checkpoint(args.format, args.src, args.out, args)
            _log(f"wrote {out} ({time.time() - t0:.1f}s)")
        elif args.command == "export":
            out = export_checkpoint(args.format, args.src, args.out, dtype=args.dtype, drop_k_bias=args.drop_k_bias,
                                    platforms=args.platforms)
            _log(f"wrote {out} ({time.time() - t0:.1f}s)")
        else:
            tol = DEFAULT_TOL[args.dtype] if args.tol is None else args.tol
            if args.format == "hf_llava":
                from idmr_jax.weights import llava_convert

                worst, _ = llava_convert.verify(args.src, port=args.port, dtype=args.dtype, batch=args.batch,
                                                text_len=args.text_len, seed=args.seed)
            else:
                worst, _ = verify(args.src, port=args.port, dtype=args.dtype, tol=tol, config=args.config,
                                  batch=args.batch, text_len=args.text_len, seed=args.seed)
            ok = worst <= tol  # also False for NaN
            _log(f"{'OK' if ok else 'FAIL'}: max_abs_diff {worst:.3e} {'<=' if ok else '>'} tol {tol:.1e}")
            # The contract: the last line, on stdout, is the worst difference.
            print(f"max_abs_diff={worst:.6e}", flush=True)
            if not ok:
                return 1
    except (WeightMismatchError, ConvertError, FileNotFoundError, FileExistsError) as e:
        _log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
