"""Name maps between transformers decoder LMs (Qwen2 / Llama) and :class:`idmr_jax.models.decoder_lm.DecoderLM`.

Torch names are those of ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``). The decoder's
prefix is configurable: transformers 5's ``LlavaForConditionalGeneration`` keeps its LM at
``model.language_model.`` with the head at ``lm_head.``. A tied model has no ``lm_head.weight`` rule (transformers
does not save it); :func:`load_hf_weights` accepts a checkpoint that still holds it if it equals the embedding.

:func:`lora_rules` maps the LoRA factors to PEFT adapter names (``base_model.model.<module>.lora_A.weight``
``[r, in]`` / ``lora_B.weight`` ``[out, r]``), used by :mod:`idmr_jax.weights.peft`.

The transformers ``config.json`` <-> :class:`DecoderLMConfig` translation (:func:`config_from_hf`,
:func:`hf_config_dict`) lives here too: the model module knows nothing of transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from idmr_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from idmr_jax.models.lora import lora_filter
from idmr_jax.weights.mapping import (IDENTITY, LINEAR, NameMap, Rule, Transform, WeightMismatchError,
                                      flatten_params, load_into, per_layer, unstack_from_model)
from idmr_jax.weights.torch_io import hf_config_as_dict
from idmr_jax.weights.vit import checked_reshape, linear_nd


# ----------------------------------------------------------------------------------------------
# transformers config <-> DecoderLMConfig.

_HF_MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama"}
_HF_ARCH = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _rope_theta(c: Mapping[str, Any]) -> float:
    params = c.get("rope_parameters")
    if params is None:  # transformers 4.x config.json: top-level rope_theta (+ optional rope_scaling)
        scaling = c.get("rope_scaling") or {}
        params = {"rope_theta": c.get("rope_theta", 10000.0),
                  "rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not implemented (only the default rotary embedding); "
                         f"config rope parameters: {params}")
    return float(params.get("rope_theta", 10000.0))


def _common_from_hf(c: Mapping[str, Any], family: str) -> dict[str, Any]:
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{family} config: hidden_act {c.get('hidden_act')!r} is not supported (only silu)")
    return dict(
        family=family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        head_dim=int(c["head_dim"]) if c.get("head_dim") is not None else None,
        rope_theta=_rope_theta(c),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        initializer_range=float(c.get("initializer_range", 0.02)),
    )


def qwen2_config_from_hf(hf_config: Any, **overrides) -> DecoderLMConfig:
    """A :class:`DecoderLMConfig` from a transformers ``Qwen2Config`` (or its dict / ``config.json``);
    `overrides` set execution options (dtype, scan, remat, lora, ...). Sliding-window layers are rejected."""
    c = hf_config_as_dict(hf_config)
    if c.get("model_type", "qwen2") != "qwen2":
        raise ValueError(f"expected a qwen2 config, got model_type {c.get('model_type')!r}")
    layer_types = c.get("layer_types") or []
    if c.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ValueError(f"qwen2 config uses sliding-window attention (use_sliding_window="
                         f"{c.get('use_sliding_window')}, layer_types={layer_types}); not implemented")
    return DecoderLMConfig(**{**_common_from_hf(c, "qwen2"), "attention_bias": True, **overrides})


def llama_config_from_hf(hf_config: Any, **overrides) -> DecoderLMConfig:
    """A :class:`DecoderLMConfig` from a transformers ``LlamaConfig`` (or its dict / ``config.json``)."""
    c = hf_config_as_dict(hf_config)
    if c.get("model_type", "llama") != "llama":
        raise ValueError(f"expected a llama config, got model_type {c.get('model_type')!r}")
    kwargs = _common_from_hf(c, "llama")
    kwargs.update(attention_bias=bool(c.get("attention_bias", False)), mlp_bias=bool(c.get("mlp_bias", False)))
    return DecoderLMConfig(**{**kwargs, **overrides})


def config_from_hf(hf_config: Any, **overrides) -> DecoderLMConfig:
    """Dispatches on ``model_type`` ("qwen2" | "llama")."""
    c = hf_config_as_dict(hf_config)
    translate = {"qwen2": qwen2_config_from_hf, "llama": llama_config_from_hf}
    if c.get("model_type") not in translate:
        raise ValueError(f"unsupported decoder model_type {c.get('model_type')!r}; known: {sorted(translate)}")
    return translate[c["model_type"]](c, **overrides)


def hf_config_dict(cfg: DecoderLMConfig) -> dict[str, Any]:
    """The transformers ``config.json`` dict of `cfg` (``Qwen2Config(**d)`` / ``LlamaConfig(**d)`` accept it)."""
    d: dict[str, Any] = dict(
        model_type=_HF_MODEL_TYPE[cfg.family],
        architectures=[_HF_ARCH[cfg.family]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=0.0,
    )
    if cfg.head_dim is not None:
        d["head_dim"] = cfg.head_dim
    if cfg.family == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
        d.setdefault("head_dim", cfg.dim_per_head)
    else:
        d.update(use_sliding_window=False, sliding_window=None)
    return d

def _expect(x: np.ndarray, shape: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"expected {what} shape {tuple(shape)}, got {tuple(x.shape)}")


def _layer_linears(cfg: DecoderLMConfig) -> list[tuple[str, str, tuple, tuple, bool]]:
    """(torch module, flax path, in shape, out shape, has bias) of every per-layer Linear, ``{i}`` unexpanded."""
    d, h, kv, hd, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.intermediate_size
    qkv_bias = cfg.attention_bias
    o_bias = cfg.attention_bias and cfg.family == "llama"
    return [
        ("self_attn.q_proj", "self_attn/q_proj", (d,), (h, hd), qkv_bias),
        ("self_attn.k_proj", "self_attn/k_proj", (d,), (kv, hd), qkv_bias),
        ("self_attn.v_proj", "self_attn/v_proj", (d,), (kv, hd), qkv_bias),
        ("self_attn.o_proj", "self_attn/o_proj", (h, hd), (d,), o_bias),
        ("mlp.gate_proj", "mlp/gate_proj", (d,), (m,), cfg.mlp_bias),
        ("mlp.up_proj", "mlp/up_proj", (d,), (m,), cfg.mlp_bias),
        ("mlp.down_proj", "mlp/down_proj", (m,), (d,), cfg.mlp_bias),
    ]


def decoder_lm_rules(cfg: DecoderLMConfig, *, prefix: str = "model.", lm_head: str = "lm_head",
                     flax_prefix: str = "") -> list[Rule]:
    """Rules for the base weights (no LoRA). `prefix`: torch prefix of the decoder (``model.`` for
    ``*ForCausalLM``, ``model.language_model.`` for transformers 5 LLaVA); `lm_head`: torch name of the head
    module (unused when tied); `flax_prefix`: prefix of the flax paths (e.g. ``language_model/``)."""
    fp = flax_prefix
    rules = [Rule(f"{prefix}embed_tokens.weight", f"{fp}embed_tokens/embedding")]
    per = [Rule(f"{prefix}layers.{{i}}.input_layernorm.weight", f"{fp}layers/{{i}}/input_layernorm/scale"),
           Rule(f"{prefix}layers.{{i}}.post_attention_layernorm.weight",
                f"{fp}layers/{{i}}/post_attention_layernorm/scale")]
    for tname, fname, ins, outs, bias in _layer_linears(cfg):
        t, f = f"{prefix}layers.{{i}}.{tname}", f"{fp}layers/{{i}}/{fname}"
        per.append(Rule(f"{t}.weight", f"{f}/kernel", LINEAR if len(ins) == len(outs) == 1 else linear_nd(ins, outs)))
        if bias:
            n = int(np.prod(outs))
            per.append(Rule(f"{t}.bias", f"{f}/bias", IDENTITY if len(outs) == 1 else checked_reshape((n,), outs)))
    rules += per_layer(per, range(cfg.num_layers))
    rules.append(Rule(f"{prefix}norm.weight", f"{fp}norm/scale"))
    if not cfg.tie_word_embeddings:
        rules.append(Rule(f"{lm_head}.weight", f"{fp}lm_head/kernel", LINEAR))
    return rules


def decoder_lm_name_map(cfg: DecoderLMConfig, **kwargs) -> NameMap:
    """``NameMap(decoder_lm_rules(cfg, **kwargs))``."""
    return NameMap(decoder_lm_rules(cfg, **kwargs))


def _lora_a(ins: tuple, r: int) -> Transform:
    n = int(np.prod(ins))

    def to_flax(x):
        _expect(x, (r, n), "PEFT lora_A weight")
        return np.ascontiguousarray(x.T.reshape(ins + (r,)))

    def to_torch(x):
        _expect(x, ins + (r,), "flax lora_a")
        return np.ascontiguousarray(x.reshape(n, r).T)

    return Transform(f"lora_A[{r},{n}]->{ins + (r,)}", to_flax, to_torch)


def _lora_b(outs: tuple, r: int) -> Transform:
    n = int(np.prod(outs))

    def to_flax(x):
        _expect(x, (n, r), "PEFT lora_B weight")
        return np.ascontiguousarray(x.T.reshape((r,) + outs))

    def to_torch(x):
        _expect(x, (r,) + outs, "flax lora_b")
        return np.ascontiguousarray(x.reshape(r, n).T)

    return Transform(f"lora_B[{n},{r}]->{(r,) + outs}", to_flax, to_torch)


def lora_rules(cfg: DecoderLMConfig, *, module_prefix: str = "model.", lm_head: str = "lm_head",
               peft_prefix: str = "base_model.model.", flax_prefix: str = "") -> list[Rule]:
    """Rules between the LoRA factors of the layers ``cfg.lora`` targets and PEFT adapter tensor names
    (``{peft_prefix}{module_prefix}layers.{i}.self_attn.q_proj.lora_A.weight``; adapter name stripped, as
    PEFT saves). `module_prefix` is the decoder's module path inside the PEFT-wrapped torch model."""
    if cfg.lora is None:
        raise ValueError("lora_rules: the config has no LoRA (cfg.lora is None)")
    r, fp = int(cfg.lora.rank), flax_prefix
    per = []
    for tname, fname, ins, outs, _ in _layer_linears(cfg):
        if not cfg.lora.applies_to(fname.rsplit("/", 1)[-1]):
            continue
        t, f = f"{peft_prefix}{module_prefix}layers.{{i}}.{tname}", f"{fp}layers/{{i}}/{fname}"
        per += [Rule(f"{t}.lora_A.weight", f"{f}/lora_a", _lora_a(ins, r)),
                Rule(f"{t}.lora_B.weight", f"{f}/lora_b", _lora_b(outs, r))]
    rules = per_layer(per, range(cfg.num_layers))
    if not cfg.tie_word_embeddings and cfg.lora.applies_to("lm_head"):
        t = f"{peft_prefix}{lm_head}"
        rules += [Rule(f"{t}.lora_A.weight", f"{fp}lm_head/lora_a", _lora_a((cfg.hidden_size,), r)),
                  Rule(f"{t}.lora_B.weight", f"{fp}lm_head/lora_b", _lora_b((cfg.vocab_size,), r))]
    return rules


def lora_target_modules(cfg: DecoderLMConfig) -> list[str]:
    """The short module names that actually carry LoRA (PEFT's ``target_modules``), sorted."""
    names = {f.rsplit("/", 1)[-1] for _, f, *_ in _layer_linears(cfg)}
    if not cfg.tie_word_embeddings:
        names.add("lm_head")
    return sorted(n for n in names if cfg.lora is not None and cfg.lora.applies_to(n))


# ----------------------------------------------------------------------------------------------
# Loading into / exporting from a module.


def _base_filter(cfg: DecoderLMConfig):
    return nnx.All(nnx.Param, nnx.Not(lora_filter)) if cfg.lora is not None else nnx.Param


def drop_tied_head(state_dict: Mapping[str, Any], cfg: DecoderLMConfig, *, prefix: str = "model.",
                   lm_head: str = "lm_head", source: str = "checkpoint") -> dict[str, Any]:
    """`state_dict` without ``{lm_head}.weight`` when the config ties the embeddings (transformers may still save
    the head); accepted only if it equals the embedding, else :class:`WeightMismatchError`."""
    sd = dict(state_dict)
    head, emb = f"{lm_head}.weight", f"{prefix}embed_tokens.weight"
    if cfg.tie_word_embeddings and head in sd:
        if emb not in sd or not np.array_equal(np.asarray(sd[head]), np.asarray(sd[emb])):
            raise WeightMismatchError(f"{source}: the config ties the embeddings but {head!r} differs from {emb!r}")
        sd.pop(head)
    return sd


def load_hf_weights(model: DecoderLM, state_dict: Mapping[str, Any], *, prefix: str = "model.",
                    lm_head: str = "lm_head", source: str = "checkpoint", ignore: tuple[str, ...] = ()) -> None:
    """Strictly loads a transformers state dict into `model`'s base weights (LoRA factors are left as they are).

    Every tensor must be used: other entries raise unless matched by an `ignore` regex. A tied model accepts
    a stored ``lm_head.weight`` only if it equals the embedding.
    """
    cfg = model.cfg
    sd = drop_tied_head(state_dict, cfg, prefix=prefix, lm_head=lm_head, source=source)
    flat = decoder_lm_name_map(cfg, prefix=prefix, lm_head=lm_head).torch_to_flax(sd, source=source, ignore=ignore)
    load_into(model, flat, source=source, variables=_base_filter(cfg))


def export_hf_state_dict(model_or_flat: Any, cfg: DecoderLMConfig, *, prefix: str = "model.",
                         lm_head: str = "lm_head") -> dict[str, np.ndarray]:
    """transformers-named base weights (LoRA factors excluded; :func:`idmr_jax.models.lora.merge` them first
    to export a merged model) of a module or of its flat params, in the params' dtype."""
    flat = flatten_params(model_or_flat) if isinstance(model_or_flat, nnx.Module) else dict(model_or_flat)
    flat = {k: np.asarray(v) for k, v in flat.items() if k.rsplit("/", 1)[-1] not in ("lora_a", "lora_b")}
    name_map = decoder_lm_name_map(cfg, prefix=prefix, lm_head=lm_head)
    return name_map.flax_to_torch(unstack_from_model(flat, name_map))
