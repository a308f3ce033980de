"""Name maps between PyTorch ViT checkpoints and :class:`idmr_jax.models.vit.VisionTransformer`.

Three sources, each as a list of :class:`~idmr_jax.weights.mapping.Rule` (wrap in ``NameMap``, nest with
``mapping.prefixed``):

* :func:`hf_blip2_vision_rules`: transformers ``Blip2VisionModel`` (names relative to it; in BLIP-2 checkpoints
  they sit under ``vision_model.``). ``post_layernorm`` is not included: it is BLIP-2's ``ln_vision`` and
  belongs to the BLIP-2 assembly.
* :func:`hf_clip_vision_rules`: transformers ``CLIPVisionModel`` (names relative to it; hub CLIP checkpoints
  put them under ``vision_model.``), including ``pre_layrnorm`` and ``post_layernorm``.
* :func:`lavis_eva_rules`: LAVIS ``eva_vit.VisionTransformer`` (names relative to ``visual_encoder.``).

LAVIS stores the EVA attention bias as two tensors ``attn.q_bias`` and ``attn.v_bias`` (k bias implicitly
zero) while transformers and this port hold one fused ``qkv`` bias. A Rule maps one tensor to one param, so
the LAVIS map names a fused tensor ``blocks.{i}.attn.qkv.bias`` that :func:`fuse_lavis_qv_bias` creates from
the pair (and :func:`split_lavis_qkv_bias` splits again for export).

:func:`import_hf_clip_vision` is the ``convert import --format hf_clip_vision`` importer.

Flax paths are written unstacked (``encoder/layers/{i}/...``); ``mapping.load_into`` / ``stack_for_model``
stack them for scanned models (``encoder/layers/...`` with a leading layer axis).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idmr_jax.models.vit import ViTConfig
from idmr_jax.weights import io, torch_io
from idmr_jax.weights.conversion import (BUFFER_IGNORES, ConvertError, Imported, ImportOptions, apply_overrides,
                                         hf_config_of)
from idmr_jax.weights.mapping import (CONV2D, IDENTITY, LINEAR, NameMap, Rule, Transform, WeightMismatchError,
                                      load_into, per_layer, prefixed)
from idmr_jax.weights.torch_io import hf_config_as_dict


def _expect(x: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    # Same-size reshapes would otherwise silently accept a tensor of the wrong layout.
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"expected {what} shape {tuple(shape)}, got {tuple(x.shape)}")


def checked_reshape(torch_shape: Sequence[int], flax_shape: Sequence[int]) -> Transform:
    """Reshape between fixed shapes that also checks the source shape exactly (in both directions)."""
    ts, fs = tuple(torch_shape), tuple(flax_shape)

    def to_flax(x):
        _expect(x, ts, "torch")
        return np.ascontiguousarray(x.reshape(fs))

    def to_torch(x):
        _expect(x, fs, "flax")
        return np.ascontiguousarray(x.reshape(ts))

    return Transform(f"reshape{ts}->{fs}", to_flax, to_torch)


def linear_nd(in_shape: Sequence[int], out_shape: Sequence[int]) -> Transform:
    """torch Linear weight ``[prod(out), prod(in)]`` <-> Flax kernel ``in_shape + out_shape`` (e.g. per-head)."""
    ins, outs = tuple(in_shape), tuple(out_shape)
    n_in, n_out = math.prod(ins), math.prod(outs)

    def to_flax(x):
        _expect(x, (n_out, n_in), "torch Linear weight")
        return np.ascontiguousarray(x.T.reshape(ins + outs))

    def to_torch(x):
        _expect(x, ins + outs, "flax kernel")
        return np.ascontiguousarray(x.reshape(n_in, n_out).T)

    return Transform(f"linear{ins}->{outs}", to_flax, to_torch)


def _norm(torch_name: str, flax_path: str) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", f"{flax_path}/scale"), Rule(f"{torch_name}.bias", f"{flax_path}/bias")]


def _linear(torch_name: str, flax_path: str, transform: Transform = LINEAR, bias: Transform = IDENTITY,
            use_bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_name}.weight", f"{flax_path}/kernel", transform)]
    if use_bias:
        rules.append(Rule(f"{torch_name}.bias", f"{flax_path}/bias", bias))
    return rules


def _eva_block_rules(cfg: ViTConfig, block: str, names: Mapping[str, str]) -> list[Rule]:
    """Per-layer rules (with ``{i}``) shared by the HF Blip2 and LAVIS EVA layouts; `names` gives torch names."""
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    flax = "encoder/layers/{i}"
    rules = _norm(f"{block}.{names['norm1']}", f"{flax}/norm1")
    rules += [Rule(f"{block}.{names['qkv']}.weight", f"{flax}/attn/qkv/kernel", linear_nd((d,), (3, h, hd)))]
    if cfg.qkv_bias:
        rules += [Rule(f"{block}.{names['qkv']}.bias", f"{flax}/attn/qkv/bias", checked_reshape((3 * d,), (3, h, hd)))]
    rules += _linear(f"{block}.{names['proj']}", f"{flax}/attn/out", linear_nd((h, hd), (d,)))
    rules += _norm(f"{block}.{names['norm2']}", f"{flax}/norm2")
    rules += _linear(f"{block}.mlp.fc1", f"{flax}/mlp/fc1")
    rules += _linear(f"{block}.mlp.fc2", f"{flax}/mlp/fc2")
    return rules


def _check_style(cfg: ViTConfig, style: str, who: str) -> None:
    if cfg.style != style:
        raise ValueError(f"{who} needs a {style!r}-style ViTConfig, got style={cfg.style!r}")


def hf_blip2_vision_rules(cfg: ViTConfig) -> list[Rule]:
    """Rules for transformers ``Blip2VisionModel`` state-dict names (without ``post_layernorm``)."""
    _check_style(cfg, "eva", "hf_blip2_vision_rules")
    d, n = cfg.width, cfg.num_positions
    rules = [
        Rule("embeddings.class_embedding", "embeddings/cls_token", checked_reshape((1, 1, d), (d,))),
        Rule("embeddings.position_embedding", "embeddings/pos_embed", checked_reshape((1, n, d), (n, d))),
        Rule("embeddings.patch_embedding.weight", "embeddings/patch_embed/kernel", CONV2D),
        Rule("embeddings.patch_embedding.bias", "embeddings/patch_embed/bias"),
    ]
    names = dict(norm1="layer_norm1", qkv="self_attn.qkv", proj="self_attn.projection", norm2="layer_norm2")
    return rules + per_layer(_eva_block_rules(cfg, "encoder.layers.{i}", names), range(cfg.depth))


def lavis_eva_rules(cfg: ViTConfig) -> list[Rule]:
    """Rules for LAVIS EVA-ViT names relative to ``visual_encoder.``.

    The LAVIS pair ``blocks.{i}.attn.q_bias`` / ``attn.v_bias`` appears here as one fused tensor
    ``blocks.{i}.attn.qkv.bias``: pass LAVIS state dicts through :func:`fuse_lavis_qv_bias` before
    ``NameMap.torch_to_flax`` and exported ones through :func:`split_lavis_qkv_bias`.
    """
    _check_style(cfg, "eva", "lavis_eva_rules")
    d, n = cfg.width, cfg.num_positions
    rules = [
        Rule("cls_token", "embeddings/cls_token", checked_reshape((1, 1, d), (d,))),
        Rule("pos_embed", "embeddings/pos_embed", checked_reshape((1, n, d), (n, d))),
        Rule("patch_embed.proj.weight", "embeddings/patch_embed/kernel", CONV2D),
        Rule("patch_embed.proj.bias", "embeddings/patch_embed/bias"),
    ]
    names = dict(norm1="norm1", qkv="attn.qkv", proj="attn.proj", norm2="norm2")
    return rules + per_layer(_eva_block_rules(cfg, "blocks.{i}", names), range(cfg.depth))


def hf_clip_vision_rules(cfg: ViTConfig) -> list[Rule]:
    """Rules for transformers ``CLIPVisionModel`` names (hub CLIP checkpoints add a ``vision_model.`` prefix)."""
    _check_style(cfg, "clip", "hf_clip_vision_rules")
    d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
    rules = [
        Rule("embeddings.class_embedding", "embeddings/cls_token"),
        Rule("embeddings.position_embedding.weight", "embeddings/pos_embed"),
        Rule("embeddings.patch_embedding.weight", "embeddings/patch_embed/kernel", CONV2D),
        *_norm("pre_layrnorm", "pre_norm"),
    ]
    block, flax = "encoder.layers.{i}", "encoder/layers/{i}"
    layer = _norm(f"{block}.layer_norm1", f"{flax}/norm1")
    for torch_proj, flax_proj in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        layer += _linear(f"{block}.self_attn.{torch_proj}", f"{flax}/attn/{flax_proj}", linear_nd((d,), (h, hd)),
                         bias=checked_reshape((d,), (h, hd)))
    layer += _linear(f"{block}.self_attn.out_proj", f"{flax}/attn/out", linear_nd((h, hd), (d,)))
    layer += _norm(f"{block}.layer_norm2", f"{flax}/norm2")
    layer += _linear(f"{block}.mlp.fc1", f"{flax}/mlp/fc1")
    layer += _linear(f"{block}.mlp.fc2", f"{flax}/mlp/fc2")
    return rules + per_layer(layer, range(cfg.depth)) + _norm("post_layernorm", "post_norm")


# ----------------------------------------------------------------------------------------------
# LAVIS q/v bias pair <-> fused qkv bias.

_QV = re.compile(r"(?P<block>blocks\.\d+\.attn)\.(?P<which>q|v)_bias")


def fuse_lavis_qv_bias(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Replaces every LAVIS ``{prefix}blocks.{i}.attn.q_bias`` / ``v_bias`` pair with one fused
    ``{prefix}blocks.{i}.attn.qkv.bias`` = concat(q, zeros, v), as LAVIS builds it in its forward pass.

    Other entries pass through untouched. A q bias without its v bias (or vice versa) raises
    :class:`WeightMismatchError` naming the tensor.
    """
    out: dict[str, Any] = {}
    pairs: dict[str, dict[str, Any]] = {}
    for name, value in state_dict.items():
        m = _QV.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if m is None:
            out[name] = value
        else:
            pairs.setdefault(prefix + m["block"], {})[m["which"]] = (name, value)
    for block, pair in pairs.items():
        if set(pair) != {"q", "v"}:
            have = next(iter(pair.values()))[0]
            raise WeightMismatchError(f"checkpoint: {have!r} has no matching {'v' if 'q' in pair else 'q'}_bias")
        q, v = np.asarray(pair["q"][1]), np.asarray(pair["v"][1])
        if q.shape != v.shape or q.ndim != 1:
            raise WeightMismatchError(f"checkpoint: {block}.q_bias {q.shape} / v_bias {v.shape} must be equal 1-D")
        out[f"{block}.qkv.bias"] = np.concatenate([q, np.zeros_like(q), v])
    return out


def split_lavis_qkv_bias(state_dict: Mapping[str, Any], prefix: str = "", *, drop_k_bias: bool = False
                         ) -> dict[str, Any]:
    """Inverse of :func:`fuse_lavis_qv_bias` for export to LAVIS names.

    LAVIS has no k bias. A nonzero k third (possible after training the fused bias) raises
    :class:`WeightMismatchError` unless `drop_k_bias`; dropping it is exact for the outputs, since a key bias
    only adds a per-query constant to all attention logits, which softmax ignores.
    """
    fused = re.compile(re.escape(prefix) + r"(blocks\.\d+\.attn)\.qkv\.bias")
    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        m = fused.fullmatch(name)
        if m is None:
            out[name] = value
            continue
        b = np.asarray(value)
        q, k, v = np.split(b, 3)
        if not drop_k_bias and np.any(k != 0):
            raise WeightMismatchError(f"{name!r}: the k part is nonzero and LAVIS has no k bias "
                                      "(pass drop_k_bias=True; it does not change the outputs)")
        out[f"{prefix}{m[1]}.q_bias"], out[f"{prefix}{m[1]}.v_bias"] = q, v
    return out


# ----------------------------------------------------------------------------------------------
# transformers config <-> ViTConfig.

_HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_STYLE_OF_MODEL_TYPE = {"blip_2_vision_model": "eva", "clip_vision_model": "clip"}


def square_size(v: Any, what: str) -> int:
    """A transformers size field (an int, or a square [h, w]) as one int; ValueError naming `what` if not square."""
    if isinstance(v, list | tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square {what} {v} is not supported")
        v = v[0]
    return int(v)


def vit_config_from_hf(hf_vision_config: Any, **overrides) -> ViTConfig:
    """A :class:`ViTConfig` from a transformers ``Blip2VisionConfig`` (style "eva") or ``CLIPVisionConfig``
    (style "clip"), or their ``to_dict()``; `overrides` set execution options (dtype, scan, remat, ...)."""
    c = hf_config_as_dict(hf_vision_config)
    model_type = c.get("model_type")
    if model_type not in _STYLE_OF_MODEL_TYPE:
        raise ValueError(f"unsupported vision config model_type {model_type!r}; known: {sorted(_STYLE_OF_MODEL_TYPE)}")
    if c.get("num_channels", 3) != 3:
        raise ValueError(f"only 3-channel images are supported, config has num_channels={c['num_channels']}")
    if c.get("hidden_act") not in _HF_ACT:
        raise ValueError(f"unsupported hidden_act {c.get('hidden_act')!r}")
    style = _STYLE_OF_MODEL_TYPE[model_type]
    kwargs = dict(
        style=style,
        width=int(c["hidden_size"]),
        depth=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        mlp_dim=int(c["intermediate_size"]),
        patch_size=square_size(c["patch_size"], "patch_size"),
        image_size=square_size(c["image_size"], "image_size"),
        layer_norm_eps=float(c["layer_norm_eps"]),
        act=_HF_ACT[c["hidden_act"]],
    )
    if style == "eva":
        kwargs["qkv_bias"] = bool(c.get("qkv_bias", True))
    return ViTConfig(**{**kwargs, **overrides})


def hf_vision_config_kwargs(cfg: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``Blip2VisionConfig`` (style "eva") or ``CLIPVisionConfig`` (style "clip")."""
    to_hf = {v: k for k, v in _HF_ACT.items() if k != "gelu_new"}
    if cfg.act not in to_hf:
        raise ValueError(f"activation {cfg.act!r} has no transformers vision-config equivalent")
    act = to_hf[cfg.act]
    kwargs = dict(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=act,
        layer_norm_eps=cfg.layer_norm_eps,
    )
    if cfg.style == "eva":
        kwargs["qkv_bias"] = cfg.qkv_bias
    else:
        kwargs["num_channels"] = 3
    return kwargs


def hf_vision_config(cfg: ViTConfig):
    """The matching transformers config object (imports transformers lazily)."""
    import transformers

    cls = transformers.Blip2VisionConfig if cfg.style == "eva" else transformers.CLIPVisionConfig
    return cls(**hf_vision_config_kwargs(cfg))


# ----------------------------------------------------------------------------------------------
# Import (format ``hf_clip_vision``).


def import_hf_clip_vision(src: Path, opts: ImportOptions) -> Imported:
    """A transformers ``CLIPVisionModel`` folder (a full ``CLIPModel`` works too: its text tower and projections
    are skipped) -> ViT (style "clip")."""
    import transformers

    cfg_dict = hf_config_of(src, opts.config)
    if cfg_dict.get("model_type") == "clip":
        hf_vision = transformers.CLIPConfig.from_dict(cfg_dict).vision_config
        ignore = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale")
    elif cfg_dict.get("model_type") == "clip_vision_model":
        hf_vision = transformers.CLIPVisionConfig.from_dict(cfg_dict)
        ignore = (r"visual_projection\..*",)  # CLIPVisionModelWithProjection
    else:
        raise ConvertError(f"{src}: expected a CLIP config (model_type 'clip_vision_model' or 'clip'), "
                           f"got {cfg_dict.get('model_type')!r}")
    cfg = apply_overrides(vit_config_from_hf(hf_vision), opts.overrides())
    sd = torch_io.load_torch_state_dict(src, allow_nonfinite=opts.allow_nonfinite)
    # Hub CLIP checkpoints (and CLIPModel) nest the tower under `vision_model.`; transformers 5 saves a
    # CLIPVisionModel without that prefix.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    name_map = NameMap(prefixed(hf_clip_vision_rules(cfg), prefix))
    flat = name_map.torch_to_flax(sd, source=str(src), ignore=ignore + BUFFER_IGNORES)
    module = io.build_model(cfg, kind="vit", seed=opts.seed)
    load_into(module, flat, source=str(src))
    return Imported("vit", module, cfg, [])
