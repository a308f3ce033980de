"""Name map and config conversion between transformers ``InternVLVisionModel`` and
:class:`idmr_jax.models.internvit.InternViT`.

Torch names (relative to the tower): ``embeddings.cls_token`` [1, 1, D], ``embeddings.position_embeddings``
[1, 1+g*g, D], ``embeddings.patch_embeddings.projection.{weight,bias}`` (a Conv2d),
``encoder.layer.{i}.attention.{q,k,v}_proj.{weight,bias}``, ``...attention.{q,k}_norm.weight``,
``...attention.projection_layer.{weight,bias}``, ``...lambda_1`` / ``lambda_2`` [D],
``...layernorm_{before,after}.{weight,bias}`` (no bias for "rms_norm"), ``...mlp.fc{1,2}.{weight,bias}`` and,
without ``use_mean_pooling``, ``layernorm.{weight,bias}``.
"""

from __future__ import annotations

from typing import Any

from idmr_jax.models.internvit import InternViTConfig
from idmr_jax.weights.llava import activation_from_hf, activation_to_hf
from idmr_jax.weights.mapping import CONV2D, IDENTITY, LINEAR, Rule, per_layer
from idmr_jax.weights.torch_io import hf_config_as_dict
from idmr_jax.weights.vit import checked_reshape, linear_nd, square_size


def _norm_rules(torch_name: str, flax_path: str, with_bias: bool) -> list[Rule]:
    rules = [Rule(f"{torch_name}.weight", f"{flax_path}/scale")]
    return rules + [Rule(f"{torch_name}.bias", f"{flax_path}/bias")] if with_bias else rules


def _linear_rules(torch_name: str, flax_path: str, weight=LINEAR, bias=IDENTITY, use_bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_name}.weight", f"{flax_path}/kernel", weight)]
    return rules + [Rule(f"{torch_name}.bias", f"{flax_path}/bias", bias)] if use_bias else rules


def internvit_rules(cfg: InternViTConfig) -> list[Rule]:
    """Rules of the transformers ``InternVLVisionModel`` names, relative to the tower."""
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    rules = [Rule("embeddings.cls_token", "embeddings/cls_token", checked_reshape((1, 1, d), (d,))),
             *_linear_rules("embeddings.patch_embeddings.projection", "embeddings/patch_embed", CONV2D)]
    if cfg.use_absolute_position_embeddings:
        n = 1 + cfg.grid[0] * cfg.grid[1]
        rules.append(Rule("embeddings.position_embeddings", "embeddings/pos_embed", checked_reshape((1, n, d), (n, d))))
    block, flax = "encoder.layer.{i}", "encoder/layers/{i}"
    layer_norm = cfg.norm_type == "layer_norm"
    layer = _norm_rules(f"{block}.layernorm_before", f"{flax}/norm1", layer_norm)
    for torch_proj, flax_proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        layer += _linear_rules(f"{block}.attention.{torch_proj}", f"{flax}/attn/{flax_proj}", linear_nd((d,), (h, hd)),
                               checked_reshape((d,), (h, hd)), use_bias=cfg.qkv_bias)
    if cfg.use_qk_norm:
        layer += [Rule(f"{block}.attention.q_norm.weight", f"{flax}/attn/q_norm/scale"),
                  Rule(f"{block}.attention.k_norm.weight", f"{flax}/attn/k_norm/scale")]
    layer += _linear_rules(f"{block}.attention.projection_layer", f"{flax}/attn/out", linear_nd((h, hd), (d,)))
    layer += [Rule(f"{block}.lambda_1", f"{flax}/lambda_1"), Rule(f"{block}.lambda_2", f"{flax}/lambda_2")]
    layer += _norm_rules(f"{block}.layernorm_after", f"{flax}/norm2", layer_norm)
    layer += _linear_rules(f"{block}.mlp.fc1", f"{flax}/mlp/fc1") + _linear_rules(f"{block}.mlp.fc2", f"{flax}/mlp/fc2")
    rules += per_layer(layer, range(cfg.depth))
    if not cfg.use_mean_pooling:
        rules += _norm_rules("layernorm", "post_norm", True)
    return rules


def internvit_config_from_hf(hf_vision_config: Any, **overrides) -> InternViTConfig:
    """An :class:`InternViTConfig` from a transformers ``InternVLVisionConfig`` (or its dict); `overrides` set
    execution options (dtype, remat, ...). Masked-image-modelling configs (``use_mask_token``) are refused."""
    c = hf_config_as_dict(hf_vision_config)
    if c.get("model_type", "internvl_vision") != "internvl_vision":
        raise ValueError(f"expected an internvl_vision config, got model_type {c.get('model_type')!r}")
    if c.get("num_channels", 3) != 3:
        raise ValueError(f"only 3-channel images are supported, config has num_channels={c['num_channels']}")
    if c.get("use_mask_token", False):
        raise ValueError("use_mask_token=True (masked image modelling) is not supported")
    kwargs = dict(
        width=int(c.get("hidden_size", 1024)), depth=int(c.get("num_hidden_layers", 24)),
        num_heads=int(c.get("num_attention_heads", 16)), mlp_dim=int(c.get("intermediate_size", 4096)),
        patch_size=square_size(c.get("patch_size", 14), "patch_size"),
        image_size=square_size(c.get("image_size", 448), "image_size"),
        act=activation_from_hf(c.get("hidden_act", "gelu"), "vision hidden_act"),
        qkv_bias=bool(c.get("attention_bias", False)), use_qk_norm=bool(c.get("use_qk_norm", False)),
        norm_type=c.get("norm_type", "layer_norm"), layer_norm_eps=float(c.get("layer_norm_eps", 1e-6)),
        use_absolute_position_embeddings=bool(c.get("use_absolute_position_embeddings", True)),
        use_mean_pooling=bool(c.get("use_mean_pooling", True)))
    return InternViTConfig(**{**kwargs, **overrides})


def hf_vision_config_dict(cfg: InternViTConfig) -> dict[str, Any]:
    """The transformers ``vision_config`` dict of `cfg` (``InternVLVisionConfig(**d)`` accepts it)."""
    return {
        "model_type": "internvl_vision",
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": activation_to_hf(cfg.act),
        "attention_bias": cfg.qkv_bias,
        "use_qk_norm": cfg.use_qk_norm,
        "norm_type": cfg.norm_type,
        "layer_norm_eps": cfg.layer_norm_eps,
        "image_size": [cfg.image_size, cfg.image_size],
        "patch_size": [cfg.patch_size, cfg.patch_size],
        "num_channels": 3,
        "use_mask_token": False,
        "use_absolute_position_embeddings": cfg.use_absolute_position_embeddings,
        "use_mean_pooling": cfg.use_mean_pooling,
    }
