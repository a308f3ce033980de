"""Import and export of BLIP-2 checkpoints (formats ``hf_blip2``, ``lavis_blip2``, ``hf_bert``).

The ``*_params`` functions turn a state dict into flat Flax params and are the one place that decides which
tensors a format ignores: ``python -m idmr_jax.convert import`` and a task's pretrained init
(:mod:`idmr_jax.tasks.oacir.pretrained`) both go through them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.weights import io, torch_io
from idmr_jax.weights.blip2 import names
from idmr_jax.weights.conversion import (BUFFER_IGNORES, ConvertError, ExportOptions, Imported, ImportOptions,
                                         apply_overrides, config_beside, hf_config_of, log, read_json,
                                         summarise_paths)
from idmr_jax.weights.mapping import WeightMismatchError, load_into, load_partial, unstack_from_model
from idmr_jax.weights.vit import fuse_lavis_qv_bias, split_lavis_qkv_bias

# ----------------------------------------------------------------------------------------------
# State dict -> flat params (shared by the CLI and the tasks' pretrained init).


def parse_hf_blip2_config(cfg_dict: dict):
    """The ``transformers.Blip2Config`` of a config.json dict (model_type "blip-2", else :class:`ConvertError`)."""
    import transformers

    if cfg_dict.get("model_type") != "blip-2":
        raise ConvertError(f"expected a transformers BLIP-2 config (model_type 'blip-2'), "
                           f"got model_type {cfg_dict.get('model_type')!r}")
    return transformers.Blip2Config.from_dict(cfg_dict)


def hf_blip2_params(sd: Mapping[str, Any], cfg, *, source: str, retrieval: bool = True,
                    text_input: bool = False) -> dict[str, np.ndarray]:
    """Flat :class:`~idmr_jax.models.blip2.Blip2` params of a transformers BLIP-2 state dict.

    `retrieval`: a ``Blip2ForImageTextRetrieval`` checkpoint (everything but ``temp``); otherwise any other Blip2
    class, of which the vision tower, query tokens and Q-Former are read (its language model is ignored) and,
    with `text_input`, the Q-Former text path.
    """
    if retrieval:
        return names.hf_blip2_retrieval_map(cfg).torch_to_flax(sd, source=source, ignore=BUFFER_IGNORES)
    name_map = names.hf_blip2_parts_map(cfg, text_input=text_input)
    return name_map.torch_to_flax(sd, source=source, ignore=tuple(names.HF_BLIP2_IGNORED) + BUFFER_IGNORES)


def lavis_blip2_params(sd: Mapping[str, Any], cfg, *, source: str, include_vision: bool = True
                       ) -> dict[str, np.ndarray]:
    """Flat Blip2 params of a LAVIS ``Blip2Qformer`` state dict (its BERT LM head and buffers are ignored)."""
    # LAVIS keeps EVA's attention bias as a q_bias / v_bias pair; the port holds one fused qkv bias (k part 0).
    sd = fuse_lavis_qv_bias(sd, prefix="visual_encoder.")
    return names.lavis_blip2_map(cfg, include_vision=include_vision).torch_to_flax(
        sd, source=source, ignore=tuple(names.LAVIS_BLIP2_IGNORED) + BUFFER_IGNORES)


# ----------------------------------------------------------------------------------------------
# Import.


def import_hf_blip2(src: Path, opts: ImportOptions) -> Imported:
    """``hf_blip2``: a transformers BLIP-2 folder (or state dict with ``--config``)."""
    cfg_dict = hf_config_of(src, opts.config)
    hf_cfg = parse_hf_blip2_config(cfg_dict)
    cfg = apply_overrides(names.blip2_config_from_hf(hf_cfg), opts.overrides())
    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=opts.allow_nonfinite)
    archs = cfg_dict.get("architectures") or []
    module = io.build_model(cfg, kind="blip2", seed=opts.seed)
    # The architecture list decides; without one, the retrieval heads' presence does.
    retrieval = "Blip2ForImageTextRetrieval" in archs or (not archs and "itm_head.weight" in sd)
    # Generation checkpoints carry the Q-Former text path only with use_qformer_text_input=True.
    text_input = bool(getattr(hf_cfg, "use_qformer_text_input", False)) and "embeddings.word_embeddings.weight" in sd
    flat = hf_blip2_params(sd, cfg, source=str(src), retrieval=retrieval, text_input=text_input)
    fresh = load_partial(module, flat, source=str(src))
    if retrieval:
        # transformers' retrieval model has no temperature: `temp` keeps its init (0.07) and nothing else may.
        unexpected = sorted(set(fresh) - set(names.HF_RETRIEVAL_UNMAPPED))
        if unexpected:
            raise WeightMismatchError(f"{src}: the retrieval map left model params without a tensor: {unexpected[:8]}")
    else:
        log(f"{src}: {archs or 'unknown architecture'} is not Blip2ForImageTextRetrieval; imported the vision "
            f"tower, query tokens and Q-Former. Freshly initialised: {summarise_paths(fresh)}")
    return Imported("blip2", module, cfg, fresh)


def infer_lavis_config(sd: Mapping[str, np.ndarray]):
    """A Blip2Config read off LAVIS tensor shapes. The head counts are not in any shape: the ViT gets 16 at
    width 1408 (EVA ViT-g) and width // 64 otherwise, the Q-Former hidden // 64 (BERT-base: 12)."""
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


def blip2_config_from_file(path: str):
    """--config for BLIP-2: an idmr_jax model_config.json, a bare Blip2Config dict, or a transformers config.json."""
    from idmr_jax.models import blip2

    data = read_json(path)
    if "kind" in data and "config" in data:
        if data["kind"] != "blip2":
            raise ConvertError(f"{path}: describes a {data['kind']!r} model, not blip2")
        data = data["config"]
    if data.get("model_type") == "blip-2":
        return names.blip2_config_from_hf(parse_hf_blip2_config(data))
    return io.config_from_dict(blip2.Blip2Config, data)


def import_lavis_blip2(src: Path, opts: ImportOptions) -> Imported:
    """``lavis_blip2``: a LAVIS state dict; the architecture from --config, an export's model_config.json, or
    the tensor shapes (:func:`infer_lavis_config`)."""
    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=opts.allow_nonfinite)
    # `export --format lavis_blip2` leaves the architecture next to the weights: prefer it to guessing.
    beside = config_beside(src)
    if opts.config:
        cfg = blip2_config_from_file(opts.config)
    elif beside.exists():
        cfg = blip2_config_from_file(str(beside))
        log(f"{src}: architecture from {beside}")
    else:
        cfg = infer_lavis_config(sd)
        log(f"{src}: architecture inferred from tensor shapes (pass --config to set it): "
            f"{json.dumps(io.config_to_dict(cfg))}")
    cfg = apply_overrides(cfg, opts.overrides())
    # Some LAVIS checkpoints are saved without the frozen ViT (it is loaded from EVA's own file at build time).
    has_vision = any(k.startswith("visual_encoder.") for k in sd)
    if not has_vision and not opts.allow_missing_vision:
        raise ConvertError(f"{src}: no visual_encoder.* tensors; pass --allow-missing-vision to import the rest "
                           f"and keep a freshly initialised ViT")
    flat = lavis_blip2_params(sd, cfg, source=str(src), include_vision=has_vision)
    module = io.build_model(cfg, kind="blip2", seed=opts.seed)
    if has_vision:
        load_into(module, flat, source=str(src))
        return Imported("blip2", module, cfg, [])
    fresh = load_partial(module, flat, source=str(src))
    log(f"{src}: freshly initialised: {summarise_paths(fresh)}")
    return Imported("blip2", module, cfg, fresh)


def import_hf_bert(src: Path, opts: ImportOptions) -> Imported:
    """``hf_bert``: a transformers BertModel folder -> Q-Former with BLIP-2's bert-base initialisation."""
    from idmr_jax.models.qformer import QFormerConfig

    bert = hf_config_of(src, opts.config)
    if bert.get("model_type") != "bert":
        raise ConvertError(f"{src}: expected a BERT config (model_type 'bert'), got {bert.get('model_type')!r}")
    cfg = QFormerConfig(
        hidden_size=bert["hidden_size"], num_layers=bert["num_hidden_layers"], num_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"], cross_attention_freq=opts.cross_attention_freq,
        encoder_hidden_size=opts.encoder_hidden_size, vocab_size=bert["vocab_size"],
        max_position_embeddings=bert["max_position_embeddings"], layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        pad_token_id=bert.get("pad_token_id", 0) or 0, hidden_act=bert.get("hidden_act", "gelu"))
    cfg = apply_overrides(cfg, opts.overrides())
    flat, _ = names.qformer_from_bert(torch_io.load_torch_state_dict(src, allow_nonfinite=opts.allow_nonfinite), cfg)
    module = io.build_model(cfg, kind="qformer", seed=opts.seed)
    fresh = load_partial(module, flat, source=str(src))
    log(f"{src}: BERT -> Q-Former; freshly initialised: {summarise_paths(fresh)}")
    return Imported("qformer", module, cfg, fresh)


# ----------------------------------------------------------------------------------------------
# Export.


def blip2_part(source, src, fmt: str):
    """(Blip2Config, flat BLIP-2 params) of a blip2 model, or of the BLIP-2 inside an AdaFocal model."""
    from idmr_jax.models.vit import ViTConfig

    cfg, flat = source.model_config, source.flat
    if source.kind == "adafocal":
        rest = sorted(k for k in flat if not k.startswith("blip2/"))
        log(f"{src}: exporting the BLIP-2 of an AdaFocal model; {fmt} has no place for the CAAM params "
            f"({summarise_paths(rest)}); itm_head is exported as it is (AdaFocal does not train it)")
        cfg, flat = cfg.blip2, {k[len("blip2/"):]: v for k, v in flat.items() if k.startswith("blip2/")}
    elif source.kind != "blip2":
        raise ConvertError(f"{src}: holds a {source.kind!r} model; {fmt} needs a BLIP-2 or AdaFocal model")
    vision = cfg.vision
    if not isinstance(vision, ViTConfig) or vision.style != "eva":
        what = f"a {vision.style!r}-style ViT" if isinstance(vision, ViTConfig) else \
            f"an {type(vision).__name__} (kind 'efficientnet', the demo config)"
        raise ConvertError(f"{src}: the vision encoder is {what}; {fmt} holds an EVA ViT (transformers "
                           f"Blip2VisionModel / LAVIS eva_vit), so this model cannot be exported as {fmt}")
    # The LAVIS map covers every param: it gives the per-layer paths to unstack scanned layers into.
    return cfg, unstack_from_model(flat, names.lavis_blip2_map(cfg))


def export_hf_blip2(source, src, out, opts: ExportOptions) -> Path:
    """``model.safetensors`` + ``config.json`` of a ``Blip2ForImageTextRetrieval`` (``temp`` is dropped: that
    class has no temperature)."""
    cfg, flat = blip2_part(source, src, "hf_blip2")
    cfg_dict = names.hf_blip2_config(cfg).to_dict()
    cfg_dict["architectures"] = ["Blip2ForImageTextRetrieval"]
    if cfg.ln_vision_eps is not None and cfg.ln_vision_eps != cfg.vision.layer_norm_eps:
        # transformers' post_layernorm (= ln_vision) takes the ViT's eps; the exported model will use that.
        log(f"warning: ln_vision_eps={cfg.ln_vision_eps} has no place in a transformers config; the exported "
            f"model uses the ViT's layer_norm_eps={cfg.vision.layer_norm_eps} for post_layernorm")
    skipped = sorted(k for k in flat if k in set(names.HF_RETRIEVAL_UNMAPPED))
    if skipped:
        log(f"hf_blip2 has no tensor for {skipped}; not exported")
    flat = {k: v for k, v in flat.items() if k not in skipped}
    sd = names.hf_blip2_retrieval_map(cfg).flax_to_torch(flat, source=str(src))
    return torch_io.save_torch_state_dict(torch_io.cast_floats(sd, opts.dtype), out, cfg_dict)


def export_lavis_blip2(source, src, out, opts: ExportOptions) -> Path:
    """LAVIS-named ``model.safetensors`` plus ``model_config.json`` (LAVIS has no config file; ``import`` picks it
    up). LAVIS has no key bias in EVA attention: a nonzero k part of a fused qkv bias is an error unless
    ``drop_k_bias`` (exact: a key bias shifts all logits of a query equally)."""
    cfg, flat = blip2_part(source, src, "lavis_blip2")
    sd = names.lavis_blip2_map(cfg).flax_to_torch(flat, source=str(src))
    sd = split_lavis_qkv_bias(sd, prefix="visual_encoder.", drop_k_bias=opts.drop_k_bias)
    path = torch_io.save_torch_state_dict(torch_io.cast_floats(sd, opts.dtype), out)
    # LAVIS has no config.json; keep the architecture next to the weights so that a re-import needs no guess.
    (Path(out) / io.MODEL_CONFIG_FILE).write_text(
        json.dumps({"format_version": io.FORMAT_VERSION, "kind": "blip2", "config": io.config_to_dict(cfg)},
                   indent=2) + "\n")
    return path
