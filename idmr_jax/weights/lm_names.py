"""Name maps between transformers decoder LMs (Qwen2 / Llama) and :class:`idmr_jax.models.decoder_lm.DecoderLM`.

Torch names are those of ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` (``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ..., ``model.norm.weight``, ``lm_head.weight``). The decoder's
prefix is configurable: transformers 5's ``LlavaForConditionalGeneration`` keeps its LM at
``model.language_model.`` with the head at ``lm_head.``. A tied model has no ``lm_head.weight`` rule (transformers
does not save it); :func:`load_hf_weights` accepts a checkpoint that still holds it if it equals the embedding.

:func:`lora_rules` maps the LoRA factors to PEFT adapter names (``base_model.model.<module>.lora_A.weight``
``[r, in]`` / ``lora_B.weight`` ``[out, r]``), used by :mod:`idmr_jax.weights.peft_export`.
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
from idmr_jax.weights.vit_names import checked_reshape, linear_nd


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


def load_hf_weights(model: DecoderLM, state_dict: Mapping[str, Any], *, prefix: str = "model.",
                    lm_head: str = "lm_head", source: str = "checkpoint", ignore: tuple[str, ...] = ()) -> None:
    """Strictly loads a transformers state dict into `model`'s base weights (LoRA factors are left as they are).

    Every tensor must be used: other entries raise unless matched by an `ignore` regex. A tied model accepts
    a stored ``lm_head.weight`` only if it equals the embedding.
    """
    cfg = model.cfg
    sd = dict(state_dict)
    head = f"{lm_head}.weight"
    if cfg.tie_word_embeddings and head in sd:
        emb = sd[f"{prefix}embed_tokens.weight"] if f"{prefix}embed_tokens.weight" in sd else None
        if emb is None or not np.array_equal(np.asarray(sd[head]), np.asarray(emb)):
            raise WeightMismatchError(f"{source}: the config ties the embeddings but {head!r} differs from "
                                      f"{prefix}embed_tokens.weight")
        sd.pop(head)
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
