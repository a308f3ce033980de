"""Name map between idmr_jax's :class:`~idmr_jax.models.adafocal.AdaFocal` and the official PyTorch AdaFocal.

The official model is ``Blip2QformerOacirAdaFocal`` (github HaHaJun1101/OACIR,
``lavis/models/blip2_models/blip2_qformer_oacir_adafocal.py``, built on LAVIS ``Blip2Base``); the vector-beta
variant is ``Blip2QformerOacirAdaFocalVector`` (same names, ``output_head.2`` has one row per query token) and
the standard CIR baseline (our ``beta_mode`` "none" / "fixed") is ``Blip2QformerOacirBaseline`` (no CAAM
tensors). Their ``state_dict()`` (paper config: EVA ViT-g/14, 39 blocks, BERT-base Q-Former, 32 queries,
256-d, 8 probes) holds, in terms of this port's flax paths:

    visual_encoder.{cls_token [1,1,1408], pos_embed [1,257,1408], patch_embed.proj.{weight,bias}}
    visual_encoder.blocks.{i}.{norm1,norm2}.{weight,bias}, attn.qkv.weight [4224,1408], attn.{q_bias,v_bias},
        attn.proj.{weight,bias}, mlp.fc1 [6144,1408], mlp.fc2          <- blip2/vision/...  (LAVIS EVA names)
    ln_vision.{weight,bias}                                            <- blip2/ln_vision
    query_tokens [1,32,768]                                            <- blip2/query_tokens
    Qformer.bert.embeddings.{word_embeddings [30523,768], position_embeddings [512,768], LayerNorm}
    Qformer.bert.embeddings.position_ids [1,512] int64                 (persistent buffer: arange)
    Qformer.bert.encoder.layer.{i}.attention / crossattention (even i) / intermediate(_query) / output(_query)
                                                                       <- blip2/qformer/...
    Qformer.cls.predictions.{bias, decoder.weight, decoder.bias, transform.dense.{weight,bias},
        transform.LayerNorm.{weight,bias}}                             (BERT LM head; see below)
    vision_proj, text_proj [256,768] + bias                            <- blip2/vision_proj, blip2/text_proj
    temp []                                                            <- blip2/temp
    contextual_probe_tokens [1,8,768]                                  <- probe_tokens
    crm_module.cls_token [1,1,768]                                     <- crm/cls_token [1,768]
    crm_module.transformer_encoder.layers.{i}.self_attn.{in_proj_weight [2304,768], in_proj_bias,
        out_proj.{weight,bias}}, linear1 [2048,768], linear2, norm1, norm2   <- crm/layers/{i}/...
    crm_module.output_head.0 [512,768] / .2 [1,512] (+ bias)          <- crm/head_hidden, crm/head_out

Tensors the official model has and this port does not train, and what the export writes for them:

* ``Qformer.cls.*``: LAVIS builds the Q-Former as a ``BertLMHeadModel`` and keeps its masked-LM head, which
  AdaFocal never runs (its forward and inference use ``Qformer.bert`` only). The port has no LM head, and no
  import keeps one (``lavis_blip2`` / ``hf_blip2`` imports drop it), so the export writes a documented init:
  ``decoder.weight`` = the exported word embeddings (the official head is tied to them), ``bias`` and
  ``decoder.bias`` = zeros (one parameter under two names in LAVIS), ``transform.dense.weight`` ~
  N(0, initializer_range) from a fixed seed (BERT's init; reproducible), its bias zeros, ``transform.LayerNorm``
  ones / zeros. None of them changes any AdaFocal output.
* ``Qformer.bert.embeddings.position_ids``: the buffer ``arange(max_position_embeddings)``.
* The ``[DEC]`` row: LAVIS adds ``[DEC]`` to bert-base-uncased's 30522 WordPiece tokens and resizes the Q-Former
  vocabulary to 30523. A Q-Former with BERT's own 30522 rows (initialised from BERT, or at random as in
  ``configs/oacir.py``) gets one appended row of zeros (and a zero LM-head bias entry); AdaFocal's tokenizer
  call never emits ``[DEC]``, so the row is never read. The export records this (``dec_row_appended``) and the
  import drops the row again, so a round trip is bit-exact.

The port's ``blip2/itm_head`` has no official counterpart (AdaFocal has no ITM head): it is left out of the
export and keeps its fresh init on import. LAVIS holds EVA's attention bias as ``q_bias`` / ``v_bias`` (no key
bias); the port's fused ``qkv`` bias is split on export (a nonzero key third is an error unless
``drop_k_bias``: exact, a key bias shifts every logit of a query row by the same amount).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.models.adafocal import AdaFocalConfig
from idmr_jax.models.crm import CRMConfig
from idmr_jax.weights import io, torch_io, vit
from idmr_jax.weights.blip2 import convert as blip2_convert
from idmr_jax.weights.blip2 import names as blip2_names
from idmr_jax.weights.checks import is_float_dtype, read_json_file
from idmr_jax.weights.conversion import (ConvertError, ExportOptions, Imported, ImportOptions, apply_overrides,
                                         config_beside, log, summarise_paths)
from idmr_jax.weights.mapping import (IDENTITY, LINEAR, NameMap, Rule, WeightMismatchError, per_layer, prefixed,
                                      unstack_from_model)
from idmr_jax.weights.vit import checked_reshape

OFFICIAL_CLASSES = {"adaptive/scalar": "Blip2QformerOacirAdaFocal",
                    "adaptive/vector": "Blip2QformerOacirAdaFocalVector",
                    "baseline": "Blip2QformerOacirBaseline"}
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; LAVIS adds [DEC] -> 30523
WORD_EMBEDDINGS = "Qformer.bert.embeddings.word_embeddings.weight"
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
LM_HEAD_PREFIX = "Qformer.cls.predictions."
# Params of the port that the official model does not have.
UNMAPPED: tuple[str, ...] = ("blip2/itm_head/kernel", "blip2/itm_head/bias")
# Torch names an import drops: the untrained LM head and the position_ids buffer (see the module docstring).
IMPORT_IGNORED: tuple[str, ...] = (r"Qformer\.cls\..*", r"Qformer\.bert\.embeddings\.position_ids")
_LM_HEAD_SEED = 0
# (CRMConfig field, official value, what it is) of the official encoder layer; see check_exportable.
_OFFICIAL_CRM = (("num_heads", 8, "heads"), ("ffn_dim", 2048, "FFN units (dim_feedforward)"),
                 ("layer_norm_eps", 1e-5, "as LayerNorm eps"))
# The CRM fields a training config sets (configs/oacir.py ``model.caam``), named that way in errors.
_CAAM_FIELDS = ("num_heads", "ffn_dim")


def official_class(cfg: AdaFocalConfig) -> str:
    """The official LAVIS class whose state dict the export reproduces."""
    if cfg.beta_mode != "adaptive":
        return OFFICIAL_CLASSES["baseline"]
    return OFFICIAL_CLASSES["adaptive/scalar" if cfg.crm.num_outputs == 1 else "adaptive/vector"]


def check_exportable(cfg: AdaFocalConfig) -> None:
    """Raises ValueError for models the official code has no class for."""
    vision = cfg.blip2.vision
    if getattr(vision, "style", None) != "eva":
        kind = "efficientnet" if not hasattr(vision, "style") else f"{vision.style!r}-style ViT"
        raise ValueError(f"the official AdaFocal uses LAVIS' EVA ViT (visual_encoder.*); this model's vision encoder "
                         f"is a {kind}, which has no official counterpart")
    if cfg.beta_mode == "adaptive" and cfg.crm.aggregator != "transformer":
        raise ValueError(f"CRM aggregator {cfg.crm.aggregator!r} is an ablation without an official class; only "
                         f"'transformer' (crm_module.transformer_encoder) can be exported")
    if cfg.beta_mode == "adaptive":
        # Fields the official nn.TransformerEncoderLayer(d_model=768, nhead=8, dim_feedforward=2048) fixes. The
        # head count and eps are in no tensor shape: a model with other values would load strictly into the
        # official class and compute another beta. (The width d_model follows the Q-Former, as the BLIP-2 part
        # does: a tiny model keeps its tiny width, and a wrong width fails the official strict load anyway.)
        for name, official, what in _OFFICIAL_CRM:
            value = getattr(cfg.crm, name)
            if value != official:
                where = f"model.caam.{name}" if name in _CAAM_FIELDS else f"crm.{name}"
                raise ValueError(f"{where} is {value}; the official CRM has {official} {what} "
                                 f"(nn.TransformerEncoderLayer(d_model=768, nhead=8, dim_feedforward=2048))")


def _linear(torch_name: str, flax_path: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_path}/kernel", LINEAR),
            Rule(f"{torch_name}.bias", f"{flax_path}/bias")]


def _norm(torch_name: str, flax_path: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_path}/scale"), Rule(f"{torch_name}.bias", f"{flax_path}/bias")]


def crm_rules(cfg: CRMConfig) -> list[Rule]:
    """``crm_module.*`` (a PyTorch ``nn.TransformerEncoder`` stack + output head) <-> ``crm/*``."""
    d = cfg.hidden_size
    layer = [Rule("transformer_encoder.layers.{i}.self_attn.in_proj_weight", "layers/{i}/in_proj/kernel", LINEAR),
             Rule("transformer_encoder.layers.{i}.self_attn.in_proj_bias", "layers/{i}/in_proj/bias", IDENTITY)]
    layer += _linear("transformer_encoder.layers.{i}.self_attn.out_proj", "layers/{i}/out_proj")
    layer += _linear("transformer_encoder.layers.{i}.linear1", "layers/{i}/linear1")
    layer += _linear("transformer_encoder.layers.{i}.linear2", "layers/{i}/linear2")
    layer += _norm("transformer_encoder.layers.{i}.norm1", "layers/{i}/norm1")
    layer += _norm("transformer_encoder.layers.{i}.norm2", "layers/{i}/norm2")
    rules = [Rule("cls_token", "cls_token", checked_reshape((1, 1, d), (1, d)))]
    rules += per_layer(layer, range(cfg.num_layers))
    rules += _linear("output_head.0", "head_hidden") + _linear("output_head.2", "head_out")
    return prefixed(rules, "crm_module.", "crm/")


def lavis_adafocal_map(cfg: AdaFocalConfig) -> NameMap:
    """Every trained param of the port <-> its official torch name (EVA q/v biases still fused as
    ``visual_encoder.blocks.{i}.attn.qkv.bias``; :func:`to_official_state_dict` splits them)."""
    check_exportable(cfg)
    blip2 = [r for r in blip2_names.lavis_blip2_map(cfg.blip2).rules if not r.flax.startswith("itm_head/")]
    rules = prefixed(blip2, "", "blip2/")
    if cfg.beta_mode == "adaptive":
        k, d = cfg.crm.num_probes, cfg.blip2.qformer.hidden_size
        rules += [Rule("contextual_probe_tokens", "probe_tokens", checked_reshape((1, k, d), (k, d)))]
        rules += crm_rules(cfg.crm)
    return NameMap(rules)


def append_dec_row_default(cfg: AdaFocalConfig) -> bool:
    """True when the Q-Former vocabulary is bert-base-uncased's own (no [DEC] row, see the module docstring)."""
    return cfg.blip2.qformer.vocab_size == BERT_VOCAB_SIZE


def untrained_tensors(cfg: AdaFocalConfig, word_embeddings: np.ndarray, *,
                      placeholder: Callable[[tuple[int, ...], Any], np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The official tensors the port does not train: the BERT LM head and the ``position_ids`` buffer.

    `word_embeddings` is the exported (possibly [DEC]-extended) table the LM head decoder is tied to.
    `placeholder(shape, dtype)` replaces the freshly made values (shape-only export of a model never allocated).
    """
    qc = cfg.blip2.qformer
    d, vocab, dtype = qc.hidden_size, word_embeddings.shape[0], word_embeddings.dtype
    n_pos = qc.max_position_embeddings
    p = LM_HEAD_PREFIX
    if placeholder is not None:
        specs = {POSITION_IDS: ((1, n_pos), np.int64), p + "bias": ((vocab,), dtype),
                 p + "transform.dense.weight": ((d, d), dtype), p + "transform.dense.bias": ((d,), dtype),
                 p + "transform.LayerNorm.weight": ((d,), dtype), p + "transform.LayerNorm.bias": ((d,), dtype),
                 p + "decoder.bias": ((vocab,), dtype)}
        return {**{k: placeholder(s, dt) for k, (s, dt) in specs.items()}, p + "decoder.weight": word_embeddings}
    rng = np.random.default_rng(_LM_HEAD_SEED)
    return {
        POSITION_IDS: np.arange(n_pos, dtype=np.int64)[None],
        p + "bias": np.zeros(vocab, dtype),
        p + "transform.dense.weight": rng.normal(0.0, qc.initializer_range, (d, d)).astype(dtype),
        p + "transform.dense.bias": np.zeros(d, dtype),
        p + "transform.LayerNorm.weight": np.ones(d, dtype),
        p + "transform.LayerNorm.bias": np.zeros(d, dtype),
        p + "decoder.weight": word_embeddings,  # tied to the word embeddings, as in the official model
        p + "decoder.bias": np.zeros(vocab, dtype),  # LAVIS: the same parameter as `bias`
    }


def _abstract_to_torch(name_map: NameMap, flat: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """``NameMap.flax_to_torch`` on zero-stride stand-ins: each converted tensor is replaced by a zero-stride
    array of its torch shape at once, so a ViT-g export's names and shapes cost no memory."""
    missing = [r.flax for r in name_map.rules if r.flax not in flat]
    known = {r.flax for r in name_map.rules}
    leftover = sorted(k for k in flat if k not in known)
    if missing or leftover:
        raise WeightMismatchError(f"{source}: missing params {missing[:8]}, params without a torch name {leftover[:8]}")
    out = {}
    for r in name_map.rules:
        x = flat[r.flax]
        converted = r.transform.to_torch(np.broadcast_to(np.zeros((), np.int8), x.shape))
        out[r.torch] = np.broadcast_to(np.zeros((), x.dtype), converted.shape)
    return out


def to_official_state_dict(flat: Mapping[str, Any], cfg: AdaFocalConfig, *, drop_k_bias: bool = False,
                           append_dec_row: bool | None = None, source: str = "params",
                           abstract: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Flat per-layer port params -> the official AdaFocal state dict (numpy) and notes on what was added.

    `flat`: the AdaFocal params by flax path, unstacked (``mapping.unstack_from_model``), ``UNMAPPED`` included
    or not. `append_dec_row`: None = :func:`append_dec_row_default`. `abstract`: the values are zero-stride
    stand-ins (or anything with ``.shape`` / ``.dtype``): only names, shapes and dtypes are meaningful.
    Returns (state dict, notes) with notes ``{"dropped": [...], "untrained": [...], "dec_row_appended": bool}``.
    """
    name_map = lavis_adafocal_map(cfg)
    dropped = sorted(k for k in flat if k in UNMAPPED)
    flat = {k: v for k, v in flat.items() if k not in UNMAPPED}
    if abstract:
        flat = {k: np.broadcast_to(np.zeros((), v.dtype), v.shape) for k, v in flat.items()}
        sd = _abstract_to_torch(name_map, flat, source)
    else:
        sd = name_map.flax_to_torch(flat, source=source)
    sd = vit.split_lavis_qkv_bias(sd, prefix="visual_encoder.", drop_k_bias=drop_k_bias)
    # The official checkpoints are float32; a bf16 run stores its frozen ViT in bf16 (idmr_jax.precision), which
    # widens exactly.
    widen = (lambda v: np.broadcast_to(np.zeros((), np.float32), v.shape)) if abstract else (
        lambda v: np.asarray(v, np.float32))
    sd = {k: widen(v) if is_float_dtype(v.dtype) else v for k, v in sd.items()}
    dec = append_dec_row_default(cfg) if append_dec_row is None else append_dec_row
    if dec:
        emb = sd[WORD_EMBEDDINGS]
        sd[WORD_EMBEDDINGS] = np.concatenate([emb, np.zeros((1, emb.shape[1]), emb.dtype)]) if not abstract \
            else np.broadcast_to(np.zeros((), emb.dtype), (emb.shape[0] + 1, emb.shape[1]))
    placeholder = (lambda shape, dt: np.broadcast_to(np.zeros((), dt), shape)) if abstract else None
    extra = untrained_tensors(cfg, sd[WORD_EMBEDDINGS], placeholder=placeholder)
    sd.update(extra)
    return sd, {"dropped": dropped, "untrained": sorted(extra), "dec_row_appended": bool(dec)}


def from_official_state_dict(state_dict: Mapping[str, Any], cfg: AdaFocalConfig, *, dec_row_appended: bool,
                             source: str = "checkpoint") -> dict[str, np.ndarray]:
    """The official AdaFocal state dict -> flat per-layer port params (strict; ``itm_head`` is not in it).

    `dec_row_appended`: drop the last word-embedding row (the export appended it; see the module docstring).
    """
    sd = dict(state_dict)
    if dec_row_appended:
        emb = np.asarray(sd[WORD_EMBEDDINGS])
        if emb.shape[0] != cfg.blip2.qformer.vocab_size + 1:
            raise WeightMismatchError(f"{source}: {WORD_EMBEDDINGS} has {emb.shape[0]} rows; with the appended [DEC] "
                                      f"row it should have {cfg.blip2.qformer.vocab_size + 1}")
        sd[WORD_EMBEDDINGS] = emb[:-1]
    sd = vit.fuse_lavis_qv_bias(sd, prefix="visual_encoder.")
    return lavis_adafocal_map(cfg).torch_to_flax(sd, source=source, ignore=IMPORT_IGNORED)


def infer_config(state_dict: Mapping[str, Any], blip2_cfg) -> AdaFocalConfig:
    """An AdaFocalConfig from official tensor shapes, around a BLIP-2 config read off the same tensors.

    The CRM head count is not in any shape: the official code fixes ``nhead=8``.
    """
    if "crm_module.cls_token" not in state_dict:
        return AdaFocalConfig(blip2=blip2_cfg, crm=CRMConfig(hidden_size=blip2_cfg.qformer.hidden_size),
                              beta_mode="none", image_size=blip2_cfg.vision.image_size)

    def shape(name):
        if name not in state_dict:
            raise WeightMismatchError(f"cannot infer the CRM: tensor {name!r} is missing")
        return tuple(np.shape(state_dict[name]))

    prefix = "crm_module.transformer_encoder.layers."
    layers = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    crm = CRMConfig(hidden_size=shape("crm_module.cls_token")[-1], num_probes=shape("contextual_probe_tokens")[1],
                    num_layers=len(layers), num_heads=8, ffn_dim=shape(prefix + "0.linear1.weight")[0],
                    head_hidden=shape("crm_module.output_head.0.weight")[0],
                    num_outputs=shape("crm_module.output_head.2.weight")[0])
    return AdaFocalConfig(blip2=blip2_cfg, crm=crm, beta_mode="adaptive", image_size=blip2_cfg.vision.image_size)


# ----------------------------------------------------------------------------------------------
# Import / export (formats ``lavis_adafocal`` and ``jax_serving``).


def import_lavis_adafocal(src: Path, opts: ImportOptions) -> Imported:
    """An official AdaFocal state dict; the architecture from --config, the ``model_config.json`` an export
    leaves next to the weights, or the tensor shapes (:func:`infer_config`). ``itm_head`` stays at init."""
    from idmr_jax.weights import workdir

    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=opts.allow_nonfinite)
    beside = config_beside(src)
    config_file = opts.config or (str(beside) if beside.exists() else None)
    dec_row = False
    if config_file:
        data = read_json_file(config_file)
        if data.get("kind") != "adafocal":
            raise ConvertError(f"{config_file}: not an AdaFocal model_config.json (kind {data.get('kind')!r})")
        cfg = io.config_from_dict(AdaFocalConfig, data["config"])
        dec_row = bool(data.get("lavis_adafocal", {}).get("dec_row_appended", False))
        log(f"{src}: architecture from {config_file}")
    else:
        cfg = infer_config(sd, blip2_convert.infer_lavis_config(sd))
        log(f"{src}: architecture inferred from tensor shapes (pass --config to set it): "
            f"{json.dumps(io.config_to_dict(cfg))}")
    cfg = apply_overrides(cfg, opts.overrides())
    try:
        flat = from_official_state_dict(sd, cfg, dec_row_appended=dec_row, source=str(src))
    except ValueError as e:
        raise ConvertError(str(e)) from e
    # Built around the converted params (no full random init first); only itm_head is initialised.
    fresh = sorted(UNMAPPED)
    module = workdir.load_module("adafocal", cfg, flat, seed=opts.seed, source=str(src), fresh=fresh)
    log(f"{src}: freshly initialised (no official counterpart): {summarise_paths(fresh)}")
    return Imported("adafocal", module, cfg, fresh)


def require_adafocal(source, src, fmt: str) -> None:
    """Raises :class:`ConvertError` unless export source `source` holds an AdaFocal model."""
    if source.kind != "adafocal":
        raise ConvertError(f"{src}: holds a {source.kind!r} model; {fmt} needs an AdaFocal model (a training "
                           f"workdir, one of its checkpoints, or an `import --format lavis_adafocal` output)")


def export_lavis_adafocal(source, src, out, opts: ExportOptions) -> Path:
    """The official AdaFocal state dict (see the module docstring) + ``model_config.json``."""
    require_adafocal(source, src, "lavis_adafocal")
    cfg = source.model_config
    try:
        name_map = lavis_adafocal_map(cfg)
    except ValueError as e:
        raise ConvertError(f"{src}: {e}") from e
    flat = unstack_from_model(source.flat, name_map)
    sd, notes = to_official_state_dict(flat, cfg, drop_k_bias=opts.drop_k_bias, source=str(src))
    cls = official_class(cfg)
    log(f"lavis_adafocal ({cls}): left out (no official counterpart): {notes['dropped']}")
    log(f"lavis_adafocal: not trained by this port, written with documented values "
        f"(idmr_jax.weights.adafocal): {notes['untrained']}")
    if notes["dec_row_appended"]:
        log(f"lavis_adafocal: the Q-Former vocabulary has bert-base's {cfg.blip2.qformer.vocab_size} tokens; "
            f"appended LAVIS' [DEC] row (zeros, never read by AdaFocal)")
    eps = cfg.blip2.ln_vision_eps if cfg.blip2.ln_vision_eps is not None else cfg.blip2.vision.layer_norm_eps
    if eps != 1e-5:
        log(f"note: the official ln_vision is a torch LayerNorm with eps 1e-5; this model used {eps}")
    path = torch_io.save_torch_state_dict(torch_io.cast_floats(sd, opts.dtype), out)
    meta = {"format_version": io.FORMAT_VERSION, "kind": "adafocal", "config": io.config_to_dict(cfg),
            "lavis_adafocal": {"official_class": cls, **notes}, "source": source.provenance}
    (Path(out) / io.MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def export_jax_serving(source, src, out, opts: ExportOptions) -> Path:
    """``jax.export`` query / target functions + params of a trained AdaFocal (``idmr_jax.serving_export``)."""
    from idmr_jax import serving_export
    from idmr_jax.weights import workdir

    if opts.dtype:
        raise ConvertError("--dtype applies to the PyTorch formats; jax_serving keeps the trained param dtypes")
    require_adafocal(source, src, "jax_serving")
    if unknown := sorted(set(opts.platforms or ()) - set(serving_export.PLATFORMS)):
        raise ConvertError(f"--platforms: unknown {unknown}; use some of {', '.join(serving_export.PLATFORMS)}")
    module = workdir.load_module(source.kind, source.model_config, source.flat, source=str(src))
    return serving_export.export(module, out, platforms=opts.platforms, provenance=source.provenance,
                                 max_text_len=source.max_text_len)
