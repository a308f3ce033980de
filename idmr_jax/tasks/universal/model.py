"""The MLLM embedder of the universal task (and so of IDMR, LamRA, InstructCIR): its config, what trains, and how a
batch of prompts becomes embeddings.

    embedding = pool(LM(prompt tokens with the projected vision features spliced in at the image tokens))

The model is a backbone's embedder (``config.model.backbone``, `idmr_jax.tasks.universal.backbones`: LLaVA,
InternVL or Qwen2-VL); ``config.model`` and ``config.precision`` pick its sizes and dtypes, ``config.model.lora``
its adapters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from idmr_jax import precision
from idmr_jax.data.image_ops import CLIP_MEAN, CLIP_STD
from idmr_jax.losses import gradcache
from idmr_jax.models import lora as lora_lib
from idmr_jax.models.decoder_lm import DecoderLMConfig
from idmr_jax.models.efficientnet import EfficientNetEncoderConfig, EfficientNetLiteConfig
from idmr_jax.models.llava import LlavaConfig
from idmr_jax.models.vit import vit_config
from idmr_jax.tasks.universal import backbones


def uses_lora(m: ml_collections.ConfigDict) -> bool:
    """Whether ``config.model`` trains LoRA adapters (a ``lora`` entry with rank > 0) rather than the LM in full."""
    return bool(m.get("lora") and m.lora.rank)


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoRAConfig | None:
    """``config.model.lora`` as a LoRAConfig (its branch in the ``lora`` part's compute dtype, its factors float32:
    they train); None when absent or rank 0 (full tuning)."""
    if not uses_lora(config.model):
        return None
    lc = config.model.lora
    return lora_lib.LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                               dtype=_name(precision.compute_dtype(config, "lora")),
                               param_dtype=_name(precision.param_dtype(config, "lora", frozen=False)))


def _name(dtype) -> str:
    return precision.dtype_name(dtype)


def _part_dtypes(config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
    """{part: {"dtype", "param_dtype"}} under ``config.precision``; a part is frozen as `frozen_patterns` says."""
    m = config.model
    lora = uses_lora(m)
    frozen = {"vision": lora or m.freeze_vision, "projector": not m.train_projector, "text": lora}
    return {part: dict(dtype=_name(precision.compute_dtype(config, part)),
                       param_dtype=_name(precision.param_dtype(config, part, frozen=is_frozen)))
            for part, is_frozen in frozen.items()}


def model_config(config: ml_collections.ConfigDict):
    """The embedder's model config (`idmr_jax.tasks.universal.backbones`: a LlavaConfig, InternVLConfig or
    Qwen2VLConfig) from ``config.model`` and ``config.precision`` (:mod:`idmr_jax.precision`): the sizes of
    ``init.path``'s config.json when a transformers checkpoint of the backbone is given (``init.format`` hf_llava /
    hf_internvl / hf_qwen2vl), else the sizes in the config."""
    if "model" not in config:
        raise TypeError("model_config takes the whole config (config.precision sets the dtypes), not config.model")
    m = config.model
    v, t = m.vision, m.text
    backbone = backbones.backbone_of(m)
    lora = lora_config(config)
    dt = _part_dtypes(config)
    projector = dict(projector_dtype=dt["projector"]["dtype"], projector_param_dtype=dt["projector"]["param_dtype"])
    common = dict(pooling=m.pooling, pooling_token_id=m.get("pooling_token_id"))
    # The pipelines normalise pixels with CLIP's statistics; a backbone trained on others re-normalises (InternVL).
    common.update(input_mean=CLIP_MEAN, input_std=CLIP_STD)
    if m.init.format == backbones.INIT_FORMATS[backbone] and m.init.path:
        cfg = backbones.checkpoint_config(backbone, m.init.path)
        text = dataclasses.replace(cfg.text, remat=t.remat, scan=t.scan, lora=lora, **dt["text"])
        vision = dataclasses.replace(cfg.vision, **dt["vision"])
        return backbones.with_fields(cfg, vision=vision, text=text, **common, **projector)
    text = DecoderLMConfig(
        family=t.family, vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings, remat=t.remat, scan=t.scan, lora=lora,
        initializer_range=t.initializer_range, mrope_section=t.get("mrope_section"), **dt["text"])
    if backbone != "llava":
        vision = backbones.sized_vision(backbone, v, t.hidden_size, dt["vision"])
        return backbones.sized_config(backbone, m, vision, text, normalize=True, **common, **projector)
    if v.kind == "efficientnet":
        vision = EfficientNetEncoderConfig(backbone=EfficientNetLiteConfig(**dt["vision"]),
                                           feature_stride=v.feature_stride)
        layer = None
    else:
        vision = vit_config(v.variant, image_size=v.image_size, remat=v.remat, scan=v.scan, **dt["vision"])
        layer = m.vision_feature_layer
    return backbones.with_fields(LlavaConfig(
        vision=vision, text=text, image_token_id=m.image_token_id, vision_feature_layer=layer,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", normalize=True), **common, **projector)


def frozen_patterns(m: ml_collections.ConfigDict) -> tuple[str, ...]:
    """LoRA: everything but the adapters (and the projector if ``train_projector``). Else the vision tower."""
    if uses_lora(m):
        return lora_lib.frozen_patterns(extra_trainable=[r"^projector/"] if m.train_projector else [])
    frozen = [r"^vision/"] if m.freeze_vision else []
    if not m.train_projector:
        frozen.append(r"^projector/")
    return tuple(frozen)


def encode_rows(model: nnx.Module, x: dict, key) -> jax.Array:
    """One (chunk of a) batch of prompts through the embedder; dropout (LoRA's) seeded by `key`.

    `x` holds ``ids`` and ``mask`` and one of: ``pixels`` (every row has an image), ``vision`` (the vision tower's
    features, computed outside: a frozen tower runs once, outside GradCache), either with ``has_image`` (rows with
    and without an image), or nothing (text-only rows: the vision tower never runs).
    """
    if key is not None:
        nnx.reseed(model, dropout=key, policy="match_shape")
    deterministic = key is None
    if "has_image" in x:
        features = x["vision"] if "vision" in x else model.vision_features(x["pixels"])
        return model.embed_from_vision(features, x["ids"], x["mask"], has_image=x["has_image"],
                                       deterministic=deterministic)
    if "vision" in x:
        return model.embed_from_vision(x["vision"], x["ids"], x["mask"], deterministic=deterministic)
    return model.embed(x["ids"], x["mask"], x.get("pixels"), deterministic=deterministic)


def rows_from_slots(slot_features: jax.Array, has_image: jax.Array, num_shards: int) -> jax.Array:
    """Each row's image features ``[R, N, Dv]`` from the packed image slots ``[num_shards * S, N, Dv]`` (or each
    row's pixels from the packed pixels).

    The rows and the slots are both split into `num_shards` equal, batch-sharded blocks (one per device on the
    batch axes); within a block, the k-th row with an image owns the block's slot k (the packing rule of
    `idmr_jax.tasks.universal.pipeline.pack_images`), so the gather never crosses devices. Rows without an image
    get zeros.
    """
    rows = has_image.shape[0]
    slots = slot_features.shape[0] // num_shards
    blocks = slot_features.reshape(num_shards, slots, *slot_features.shape[1:])
    has = has_image.reshape(num_shards, rows // num_shards)
    index = jnp.clip(jnp.cumsum(has, axis=1) - 1, 0, slots - 1)
    trailing = (None,) * (blocks.ndim - 2)  # features [N, Dv] or pixels [H, W, C]
    picked = jnp.take_along_axis(blocks, index[(..., *trailing)], axis=1)
    picked = jnp.where(has[(..., *trailing)], picked, jnp.zeros((), picked.dtype))
    return picked.reshape(rows, *slot_features.shape[1:])


def frozen_vision_features(model: nnx.Module, pixels: jax.Array, num_chunks: int) -> jax.Array:
    """The frozen tower's features, in GradCache's chunks (bounded activation memory), without gradient."""
    if num_chunks <= 1:
        return jax.lax.stop_gradient(model.vision_features(pixels))
    feats = jax.lax.map(model.vision_features, gradcache.to_chunks(pixels, num_chunks))
    return jax.lax.stop_gradient(gradcache.from_chunks(feats))
