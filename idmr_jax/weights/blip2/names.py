"""Name maps between BLIP-2 PyTorch checkpoints (transformers, LAVIS, BERT) and the Flax ``Blip2`` / ``QFormer``.

Flax layout (paths of :class:`idmr_jax.models.blip2.Blip2`):

    vision/...                          the ViT (see ``idmr_jax.weights.vit``)
    ln_vision/{scale,bias}              HF vision_model.post_layernorm, LAVIS ln_vision
    query_tokens                        [Q, D]  (torch [1, Q, D])
    qformer/word_embeddings/embedding   HF embeddings.word_embeddings, LAVIS Qformer.bert.embeddings.word_embeddings
    qformer/position_embeddings/embedding
    qformer/layernorm/{scale,bias}      HF qformer.layernorm, LAVIS Qformer.bert.embeddings.LayerNorm
    qformer/layers/{i}/attention/{query,key,value}/{kernel [in,H,Dh], bias [H,Dh]}   (torch [D, in] / [D])
    qformer/layers/{i}/attention/out/{kernel [H,Dh,D], bias}, .../attention/norm/{scale,bias}
    qformer/layers/{i}/crossattention/...     (layers i % cross_attention_freq == 0)
    qformer/layers/{i}/ffn/{intermediate,output}/{kernel,bias}, .../ffn/norm/{scale,bias}
    qformer/layers/{i}/ffn_query/...          (HF/LAVIS intermediate_query / output_query)
    vision_proj, text_proj, itm_head    {kernel,bias}; HF vision_projection / text_projection / itm_head
    temp                                scalar; LAVIS temp. transformers' Blip2ForImageTextRetrieval has no temp.

Every map is strict (``mapping.NameMap``). Checkpoints that cover only part of the model (transformers' retrieval
model has no ``temp``; generation checkpoints have no text path; BERT has no cross-attention) go through
:func:`load_partial`, which keeps the remaining params at their current (fresh) values and returns their names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from idmr_jax.models.blip2 import Blip2Config
from idmr_jax.models.qformer import QFormerConfig, qformer_param_shapes
from idmr_jax.weights.mapping import (
    IDENTITY,
    LINEAR,
    NameMap,
    Rule,
    WeightMismatchError,
    flatten_params,
    load_partial,  # noqa: F401  (re-exported: the BLIP-2 importers load maps covering part of a model)
    prefixed,
    unstack_from_model,
)
from idmr_jax.weights.torch_io import hf_config_as_dict
from idmr_jax.weights.vit import (
    checked_reshape,
    fuse_lavis_qv_bias,
    hf_blip2_vision_rules,
    hf_vision_config_kwargs,
    lavis_eva_rules,
    linear_nd,
    split_lavis_qkv_bias,
    vit_config_from_hf,
)

# ----------------------------------------------------------------------------------------------
# Q-Former building blocks. `attn_inner` is the name of the q/k/v holder: "attention" in transformers'
# Blip2QFormerModel (`attention.attention.query`), "self" in BERT and LAVIS (`attention.self.query`).


def _linear(torch_name: str, flax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_name}/kernel", LINEAR),
            Rule(f"{torch_name}.bias", f"{flax_name}/bias", IDENTITY)]


def _norm(torch_name: str, flax_name: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_name}/scale", IDENTITY),
            Rule(f"{torch_name}.bias", f"{flax_name}/bias", IDENTITY)]


def _attention_rules(cfg: QFormerConfig, torch_block: str, flax_block: str, attn_inner: str, *,
                     kv_features: int) -> list[Rule]:
    """One attention block; q/k/v/out kernels are per-head in Flax ([in, H, Dh] / [H, Dh, D])."""
    d, heads = cfg.hidden_size, (cfg.num_heads, cfg.head_dim)
    rules = []
    for proj, din in (("query", d), ("key", kv_features), ("value", kv_features)):
        rules += [Rule(f"{torch_block}.{attn_inner}.{proj}.weight", f"{flax_block}/{proj}/kernel",
                       linear_nd((din,), heads)),
                  Rule(f"{torch_block}.{attn_inner}.{proj}.bias", f"{flax_block}/{proj}/bias",
                       checked_reshape((d,), heads))]
    rules += [Rule(f"{torch_block}.output.dense.weight", f"{flax_block}/out/kernel", linear_nd(heads, (d,))),
              Rule(f"{torch_block}.output.dense.bias", f"{flax_block}/out/bias")]
    rules += _norm(f"{torch_block}.output.LayerNorm", f"{flax_block}/norm")
    return rules


def _ffn_rules(torch_layer: str, flax_layer: str, suffix: str) -> list[Rule]:
    """FFN rules; suffix "" is the text FFN (`ffn`), "_query" the query FFN (`ffn_query`)."""
    return (_linear(f"{torch_layer}.intermediate{suffix}.dense", f"{flax_layer}/ffn{suffix}/intermediate")
            + _linear(f"{torch_layer}.output{suffix}.dense", f"{flax_layer}/ffn{suffix}/output")
            + _norm(f"{torch_layer}.output{suffix}.LayerNorm", f"{flax_layer}/ffn{suffix}/norm"))


def qformer_encoder_rules(cfg: QFormerConfig, *, attn_inner: str, text_ffn: bool = True,
                          query_path: bool = True) -> list[Rule]:
    """Rules for ``encoder.layer.{i}.*`` <-> ``layers/{i}/*`` (torch names relative to the BERT-style model).

    text_ffn: include the text FFN (``intermediate``/``output``); transformers only builds it with
      ``use_qformer_text_input=True``.
    query_path: include cross-attention and the query FFN (BERT checkpoints have neither).
    """
    rules = []
    for i in range(cfg.num_layers):
        t, f = f"encoder.layer.{i}", f"layers/{i}"
        rules += _attention_rules(cfg, f"{t}.attention", f"{f}/attention", attn_inner, kv_features=cfg.hidden_size)
        if query_path and i % cfg.cross_attention_freq == 0:
            rules += _attention_rules(cfg, f"{t}.crossattention", f"{f}/crossattention", attn_inner,
                                      kv_features=cfg.encoder_hidden_size)
        if text_ffn:
            rules += _ffn_rules(t, f, "")
        if query_path:
            rules += _ffn_rules(t, f, "_query")
    return rules


def hf_qformer_rules(cfg: QFormerConfig, *, text_input: bool = True) -> list[Rule]:
    """transformers ``Blip2QFormerModel`` (torch names relative to it) <-> :class:`QFormer` paths.

    The text embeddings live outside that model (:func:`hf_text_embedding_rules`).
    """
    return _norm("layernorm", "layernorm") + qformer_encoder_rules(cfg, attn_inner="attention", text_ffn=text_input)


def hf_text_embedding_rules(cfg: QFormerConfig) -> list[Rule]:
    """transformers ``Blip2TextEmbeddings`` (relative names; its ``position_ids`` buffer is not persistent)."""
    del cfg
    return [Rule("word_embeddings.weight", "word_embeddings/embedding"),
            Rule("position_embeddings.weight", "position_embeddings/embedding")]


# ----------------------------------------------------------------------------------------------
# transformers BLIP-2.


# Torch names in Blip2ForConditionalGeneration / Blip2Model checkpoints that the retrieval model has no use for.
HF_BLIP2_IGNORED: tuple[str, ...] = (r"language_model\..*", r"language_projection\..*")

# Params of :class:`Blip2` that transformers' Blip2ForImageTextRetrieval does not have (kept at init on import,
# left out on export).
HF_RETRIEVAL_UNMAPPED: tuple[str, ...] = ("temp",)


def _vision_and_queries(cfg: Blip2Config) -> list[Rule]:
    q, d = cfg.num_query_tokens, cfg.qformer.hidden_size
    return (prefixed(hf_blip2_vision_rules(cfg.vision), "vision_model.", "vision/")
            + _norm("vision_model.post_layernorm", "ln_vision")
            + [Rule("query_tokens", "query_tokens", checked_reshape((1, q, d), (q, d)))])


def hf_blip2_retrieval_map(cfg: Blip2Config) -> NameMap:
    """The full ``Blip2ForImageTextRetrieval`` state dict <-> :class:`Blip2` params, except ``temp``.

    Import with :func:`load_partial` (``temp`` keeps its init), export with
    ``export_state_dict(model, name_map, skip=HF_RETRIEVAL_UNMAPPED)``.
    """
    return NameMap(
        _vision_and_queries(cfg)
        + prefixed(hf_text_embedding_rules(cfg.qformer), "embeddings.", "qformer/")
        + prefixed(hf_qformer_rules(cfg.qformer, text_input=True), "qformer.", "qformer/")
        + _linear("vision_projection", "vision_proj")
        + _linear("text_projection", "text_proj")
        + _linear("itm_head", "itm_head"))


def hf_blip2_parts_map(cfg: Blip2Config, *, text_input: bool = False) -> NameMap:
    """Vision tower, ``ln_vision``, query tokens and Q-Former of any transformers BLIP-2 checkpoint.

    Use with ``ignore=HF_BLIP2_IGNORED`` (drops ``language_model.*`` / ``language_projection.*``) and
    :func:`load_partial`. Generation checkpoints (``use_qformer_text_input=False``) have no text embeddings and
    no text FFN: those stay at init. Pass ``text_input=True`` for checkpoints that have them.
    """
    rules = _vision_and_queries(cfg)
    if text_input:
        rules += prefixed(hf_text_embedding_rules(cfg.qformer), "embeddings.", "qformer/")
    rules += prefixed(hf_qformer_rules(cfg.qformer, text_input=text_input), "qformer.", "qformer/")
    return NameMap(rules)


# ----------------------------------------------------------------------------------------------
# LAVIS BLIP-2 (blip2_qformer.Blip2Qformer: pretrain / feature extractor / image-text matching).


# `Qformer.cls.*` is the BertLMHeadModel's language-modelling head (BLIP-2's image-grounded text generation loss);
# retrieval never uses it. `position_ids` is a persistent buffer in LAVIS' BertEmbeddings, not a weight.
LAVIS_BLIP2_IGNORED: tuple[str, ...] = (r"Qformer\.cls\..*", r"Qformer\.bert\.embeddings\.position_ids")


def lavis_blip2_map(cfg: Blip2Config, *, include_vision: bool = True) -> NameMap:
    """LAVIS ``Blip2Qformer`` state dict <-> :class:`Blip2` params (use with ``ignore=LAVIS_BLIP2_IGNORED``).

    LAVIS keeps the EVA q/v biases as two tensors: pass state dicts through :func:`from_lavis_state_dict` first
    (and exported ones through :func:`to_lavis_state_dict`). Build the model with ``ln_vision_eps=1e-5`` (LAVIS'
    ``ln_vision`` is a default torch LayerNorm). include_vision=False maps everything but ``visual_encoder.*``
    (for checkpoints saved without the frozen ViT; the ViT then stays as it is).
    """
    q, d = cfg.num_query_tokens, cfg.qformer.hidden_size
    rules = prefixed(lavis_eva_rules(cfg.vision), "visual_encoder.", "vision/") if include_vision else []
    rules += _norm("ln_vision", "ln_vision")
    rules += [Rule("query_tokens", "query_tokens", checked_reshape((1, q, d), (q, d)))]
    rules += [Rule("Qformer.bert.embeddings.word_embeddings.weight", "qformer/word_embeddings/embedding"),
              Rule("Qformer.bert.embeddings.position_embeddings.weight", "qformer/position_embeddings/embedding")]
    rules += _norm("Qformer.bert.embeddings.LayerNorm", "qformer/layernorm")
    rules += prefixed(qformer_encoder_rules(cfg.qformer, attn_inner="self"), "Qformer.bert.", "qformer/")
    rules += _linear("vision_proj", "vision_proj") + _linear("text_proj", "text_proj")
    rules += _linear("itm_head", "itm_head")
    rules += [Rule("temp", "temp")]
    return NameMap(rules)


def from_lavis_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """LAVIS state dict -> the names :func:`lavis_blip2_map` expects (fuses ``visual_encoder`` q/v biases)."""
    return fuse_lavis_qv_bias(state_dict, prefix="visual_encoder.")


def to_lavis_state_dict(state_dict: Mapping[str, Any], *, drop_k_bias: bool = False) -> dict[str, Any]:
    """Inverse of :func:`from_lavis_state_dict` (splits the fused qkv bias into LAVIS' q_bias / v_bias; see
    ``idmr_jax.weights.vit.split_lavis_qkv_bias`` for ``drop_k_bias``)."""
    return split_lavis_qkv_bias(state_dict, prefix="visual_encoder.", drop_k_bias=drop_k_bias)


# ----------------------------------------------------------------------------------------------
# BERT -> Q-Former initialisation (BLIP-2 starts its Q-Former from bert-base-uncased).


# Tensors of BERT checkpoints that the Q-Former has no place for: the pooler, the pre-training heads of
# BertForPreTraining / BertForMaskedLM checkpoints, and the position_ids buffer.
BERT_IGNORED: tuple[str, ...] = (r"pooler\..*", r"cls\..*", r"embeddings\.position_ids")


def qformer_from_bert(state_dict: Mapping[str, Any], cfg: QFormerConfig, *, fold_token_type: bool = True,
                      flax_prefix: str = "") -> tuple[dict[str, np.ndarray], list[str]]:
    """Converts BertModel weights into the Q-Former's text / self-attention path, as BLIP-2 initialises it.

    * embeddings, self-attention and text FFN of every layer come from BERT (same layer index);
    * the query FFN (``ffn_query``) starts as a copy of the text FFN (LAVIS copies ``*_query`` from the originals);
    * cross-attention layers are left at their fresh init (as are the query tokens, which live in ``Blip2``).

    ``fold_token_type``: BERT adds ``token_type_embeddings[0]`` to every token (token_type_ids default to 0); the
    Q-Former has no token types, so the row is folded into the position embeddings, which makes the Q-Former's
    text-only pass equal to ``BertModel``. (LAVIS drops the tensor instead: ``fold_token_type=False``.)

    A leading ``bert.`` (BertForPreTraining/MaskedLM checkpoints) is stripped and legacy ``LayerNorm.gamma/beta``
    names are accepted. The pooler, ``cls.*`` heads and the ``position_ids`` buffer are ignored; any other
    unexpected tensor, a missing tensor or a wrong shape raises :class:`WeightMismatchError`.

    Returns (converted params by flax path, sorted paths of the Q-Former params left at init), both with
    ``flax_prefix`` prepended (e.g. ``"qformer/"`` for a :class:`Blip2`).
    """
    sd = {}
    strip = all(k.startswith("bert.") or k.startswith("cls.") for k in state_dict)
    for k, v in state_dict.items():
        if strip and k.startswith("bert."):
            k = k[len("bert."):]
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        sd[k] = np.asarray(v)

    tte = sd.pop("embeddings.token_type_embeddings.weight", None)
    if tte is not None and fold_token_type and "embeddings.position_embeddings.weight" in sd:
        sd["embeddings.position_embeddings.weight"] = sd["embeddings.position_embeddings.weight"] + tte[0]

    rules = ([Rule("embeddings.word_embeddings.weight", "word_embeddings/embedding"),
              Rule("embeddings.position_embeddings.weight", "position_embeddings/embedding")]
             + _norm("embeddings.LayerNorm", "layernorm")
             + qformer_encoder_rules(cfg, attn_inner="self", text_ffn=True, query_path=False))
    converted = NameMap(rules).torch_to_flax(sd, source="BERT checkpoint", ignore=BERT_IGNORED)
    for path in list(converted):
        if "/ffn/" in path:
            converted[path.replace("/ffn/", "/ffn_query/")] = converted[path].copy()

    shapes = qformer_param_shapes(cfg)
    for path, value in converted.items():
        if tuple(value.shape) != shapes[path]:
            raise WeightMismatchError(
                f"BERT checkpoint: {path!r} has shape {tuple(value.shape)}, the Q-Former expects {shapes[path]}")
    left = sorted(flax_prefix + p for p in shapes if p not in converted)
    return {flax_prefix + k: v for k, v in converted.items()}, left


# ----------------------------------------------------------------------------------------------
# Partial import / export.


def export_state_dict(module: nnx.Module, name_map: NameMap, *, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Module params -> torch-named state dict (numpy). `skip` lists params the checkpoint format has no slot
    for (e.g. :data:`HF_RETRIEVAL_UNMAPPED`); anything else without a torch name is an error."""
    flat = unstack_from_model(flatten_params(module), name_map)
    return name_map.flax_to_torch({k: v for k, v in flat.items() if k not in set(skip)})


# ----------------------------------------------------------------------------------------------
# Configs.


# transformers' ACT2FN names <-> idmr_jax.models.layers.ACTIVATIONS names.
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_HF_ACT_BACK = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def qformer_config_from_hf(hf_qformer_config, **overrides) -> QFormerConfig:
    """QFormerConfig from a ``transformers.Blip2QFormerConfig`` (or a dict with its fields)."""
    c = hf_config_as_dict(hf_qformer_config)
    kwargs = dict(
        hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], cross_attention_freq=c["cross_attention_frequency"],
        encoder_hidden_size=c["encoder_hidden_size"], vocab_size=c["vocab_size"],
        max_position_embeddings=c["max_position_embeddings"], layer_norm_eps=c["layer_norm_eps"],
        pad_token_id=c["pad_token_id"] if c.get("pad_token_id") is not None else 0, hidden_act=_HF_ACT[c["hidden_act"]],
        hidden_dropout=c["hidden_dropout_prob"], attention_dropout=c["attention_probs_dropout_prob"],
        initializer_range=c["initializer_range"])
    kwargs.update(overrides)
    return QFormerConfig(**kwargs)


def hf_qformer_config_kwargs(cfg: QFormerConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.Blip2QFormerConfig`` (always with the text input path)."""
    return dict(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, cross_attention_frequency=cfg.cross_attention_freq,
        encoder_hidden_size=cfg.encoder_hidden_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id, hidden_act=_HF_ACT_BACK[cfg.hidden_act], hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, initializer_range=cfg.initializer_range,
        use_qformer_text_input=True)


def blip2_config_from_hf(hf_config, **overrides) -> Blip2Config:
    """:class:`Blip2Config` from a ``transformers.Blip2Config``.

    ``overrides``: Blip2Config fields (``num_query_tokens``, ``embed_dim``, ...); ``vision=dict(...)`` /
    ``qformer=dict(...)`` override sub-config fields; ``dtype`` / ``param_dtype`` apply to both sub-configs.
    """
    overrides = dict(overrides)
    vision_over = dict(overrides.pop("vision", {}))
    qformer_over = dict(overrides.pop("qformer", {}))
    for key in ("dtype", "param_dtype"):
        if key in overrides:
            value = overrides.pop(key)
            vision_over.setdefault(key, value)
            qformer_over.setdefault(key, value)
    vision = vit_config_from_hf(hf_config.vision_config, **vision_over)
    qformer = qformer_config_from_hf(hf_config.qformer_config, **qformer_over)
    kwargs = dict(vision=vision, qformer=qformer, num_query_tokens=hf_config.num_query_tokens,
                  embed_dim=hf_config.image_text_hidden_size)
    fields = {f.name for f in dataclasses.fields(Blip2Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown Blip2Config overrides {unknown}")
    kwargs.update(overrides)
    return Blip2Config(**kwargs)


def hf_blip2_config(cfg: Blip2Config):
    """``transformers.Blip2Config`` for a :class:`Blip2Config`, with ``use_qformer_text_input=True`` on both the
    Blip2Config and its Q-Former config (the retrieval model's text path needs it)."""
    import transformers

    qformer_kwargs = hf_qformer_config_kwargs(cfg.qformer)
    qformer_kwargs["encoder_hidden_size"] = cfg.vision.width
    return transformers.Blip2Config(
        vision_config=hf_vision_config_kwargs(cfg.vision),
        qformer_config=qformer_kwargs,
        num_query_tokens=cfg.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
        use_qformer_text_input=True,
    )
