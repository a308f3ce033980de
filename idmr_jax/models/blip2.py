"""BLIP-2 (first stage: ViT + Q-Former) for retrieval, in Flax NNX.

The assembly of transformers' ``Blip2ForImageTextRetrieval`` / LAVIS ``Blip2Qformer``:

    pixels --ViT--> tokens --ln_vision--> image_embeds [B, N, Dv]
    image-only pass:  query_tokens x image_embeds            -> [B, Q, D] -> vision_proj -> L2norm  (image_features)
    text-only pass:   text                                    -> [B, T, D] -> text [CLS] -> text_proj -> L2norm
    multimodal pass:  [query_tokens; text] x image_embeds     -> [B, Q+T, D]  (ITM head on the Q query outputs;
                      AdaFocal: text [CLS] at index Q -> text_proj, with other query tokens / a cross-attn bias)

Parameters: ``vision`` (:class:`VisionTransformer`), ``ln_vision`` (trainable LayerNorm on the ViT tokens;
transformers' ``vision_model.post_layernorm``), ``query_tokens`` [Q, D] (N(0, 0.02) init), ``qformer``
(:class:`QFormer`, text embeddings included), ``vision_proj`` / ``text_proj`` (D -> embed_dim), ``itm_head``
(D -> 2) and the contrastive temperature ``temp`` (a scalar, init 0.07; LAVIS clamps it to [0.001, 0.5] in its loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models.qformer import QFormer, QFormerConfig
from idmr_jax.models.vision import VisionConfig, build_vision_encoder, vision_layer_norm_eps
from idmr_jax.models.vit import ViTConfig, vit_config
from idmr_jax.sharding import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """BLIP-2 retrieval model: a ViT, a Q-Former and the projection heads.

    ``ln_vision_eps``: epsilon of ``ln_vision``; None uses the ViT's ``layer_norm_eps`` as transformers does
    (1e-6 for EVA-g). LAVIS builds ``ln_vision`` with torch's default 1e-5: set it for LAVIS checkpoints.
    """

    vision: VisionConfig  # a ViTConfig, or an EfficientNetEncoderConfig for the laptop demo
    qformer: QFormerConfig
    num_query_tokens: int = 32
    embed_dim: int = 256
    temp_init: float = 0.07
    ln_vision_eps: float | None = None

    def __post_init__(self):
        if self.qformer.encoder_hidden_size != self.vision.width:
            raise ValueError(f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal the ViT "
                             f"width ({self.vision.width})")


# LAVIS (``Blip2Base.init_vision_encoder``) builds ``ln_vision`` as torch's ``nn.LayerNorm(width)``: eps 1e-5.
LAVIS_LN_VISION_EPS = 1e-5


def ln_vision_eps_for(init_format: str, vision: VisionConfig) -> float | None:
    """The ``Blip2Config.ln_vision_eps`` of a model whose weights come from `init_format`.

    * ``hf_blip2``: None, the ViT's eps, as transformers' ``Blip2ForImageTextRetrieval`` builds ``post_layernorm``
      (which holds LAVIS' ``ln_vision``) with the vision config's ``layer_norm_eps`` (1e-6 for EVA-g);
    * a ViT with any other source (none, ``lavis_blip2``, ``lavis_adafocal``, ``bert``): the LAVIS / AdaFocal
      recipe, torch's default 1e-5;
    * a non-ViT encoder (the laptop demo's EfficientNet): None (1e-6); no official model exists to follow, and
      keeping it keeps the demo's published numbers.
    """
    if init_format == "hf_blip2" or not isinstance(vision, ViTConfig):
        return None
    return LAVIS_LN_VISION_EPS


def blip2_config(variant: str = "pretrain", **overrides) -> Blip2Config:
    """Named BLIP-2 configs.

    "pretrain": LAVIS ``blip2`` pretrain / ``Salesforce/blip2-itm-vit-g``: EVA ViT-g/14 (39 blocks), BERT-base
      Q-Former (cross-attention every 2nd layer, vocabulary 30522 + the ``[DEC]`` token = 30523), 32 queries, 256-d.
    "tiny": a 4x4-patch EVA ViT (width 64, 2 layers) and a 4-layer 64-wide Q-Former with 8 queries, for tests.

    ``overrides``: Blip2Config fields; ``vision=dict(...)`` / ``qformer=dict(...)`` override sub-config fields.
    """
    overrides = dict(overrides)
    vision_over = overrides.pop("vision", {})
    qformer_over = overrides.pop("qformer", {})
    if variant == "pretrain":
        vision = vit_config("eva-g/14", **vision_over)
        qformer = QFormerConfig(vocab_size=30523, encoder_hidden_size=vision.width, **qformer_over)
        base = dict(num_query_tokens=32, embed_dim=256)
    elif variant == "tiny":
        vision = vit_config("eva-tiny", **vision_over)
        qformer = QFormerConfig(**{**dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                                          encoder_hidden_size=vision.width, vocab_size=100,
                                          max_position_embeddings=32), **qformer_over})
        base = dict(num_query_tokens=8, embed_dim=32)
    else:
        raise ValueError(f"unknown BLIP-2 variant {variant!r}; known: ['pretrain', 'tiny']")
    return Blip2Config(vision=vision, qformer=qformer, **{**base, **overrides})


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis (torch ``F.normalize``), computed in float32 and returned in x's
    dtype: under bf16 the features stay bf16, so the global InfoNCE gathers half the bytes."""
    x32 = x.astype(jnp.float32)
    return (x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)).astype(x.dtype)


class Blip2(nnx.Module):
    """BLIP-2 ViT + Q-Former with the retrieval heads (see the module docstring)."""

    def __init__(self, cfg: Blip2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        qc = cfg.qformer
        dtype, param_dtype = jnp.dtype(qc.dtype), jnp.dtype(qc.param_dtype)
        self.vision = build_vision_encoder(cfg.vision, rngs=rngs)
        # ln_vision trains with the Q-Former, so it takes the Q-Former's dtypes (the ViT may run in half precision).
        eps = vision_layer_norm_eps(cfg.vision) if cfg.ln_vision_eps is None else cfg.ln_vision_eps
        self.ln_vision = L.LayerNorm(cfg.vision.width, eps=eps, axes=("vision_embed",), dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.query_tokens = L.make_param(rngs, nnx.initializers.normal(qc.initializer_range),
                                         (cfg.num_query_tokens, qc.hidden_size), (None, "embed"), param_dtype)
        self.qformer = QFormer(qc, rngs=rngs)

        def head(out_features: int, out_axis: str | None) -> L.Dense:
            return L.Dense(qc.hidden_size, out_features, in_axes=("embed",), out_axes=(out_axis,), dtype=dtype,
                           param_dtype=param_dtype, precision=qc.precision,
                           kernel_init=nnx.initializers.normal(qc.initializer_range), rngs=rngs)

        self.vision_proj = head(cfg.embed_dim, "proj")
        self.text_proj = head(cfg.embed_dim, "proj")
        self.itm_head = head(2, None)
        self.temp = L.make_param(rngs, nnx.initializers.constant(cfg.temp_init), (), (), jnp.float32)

    # -- image side -----------------------------------------------------------------------------

    def encode_image(self, pixels: Array, *, deterministic: bool = True) -> tuple[Array, tuple[int, int]]:
        """NHWC normalised pixels -> (ViT tokens after ``ln_vision`` [B, 1+gh*gw, Dv], patch grid (gh, gw))."""
        out = self.vision(pixels, deterministic=deterministic)
        return self.embed_vision_tokens(out.tokens), out.grid

    def embed_vision_tokens(self, tokens: Array) -> Array:
        """The vision encoder's tokens [B, N, Dv] -> ``ln_vision`` (trainable, unlike a frozen encoder): the half of
        `encode_image` that runs after cached frozen-encoder tokens."""
        return constrain(self.ln_vision(tokens), ("batch", "length", "vision_embed"))

    def image_hidden(self, image_embeds: Array, *, attention_bias: Array | None = None,
                     deterministic: bool = True) -> Array:
        """Image-only Q-Former pass (the learned queries, no text): [B, Q, D]."""
        return self.qformer(query_embeds=self.query_tokens[...], image_embeds=image_embeds,
                            attention_bias=attention_bias, deterministic=deterministic).last_hidden_state

    def vision_projection(self, query_hidden: Array) -> Array:
        """L2norm(vision_proj(x)) (normalised in float32, in the Q-Former's compute dtype): [..., D] -> [..., E]."""
        return l2_normalize(self.vision_proj(query_hidden))

    def image_features(self, image_embeds: Array, *, deterministic: bool = True) -> Array:
        """L2-normalised per-query image features [B, Q, E] (the retrieval target representation)."""
        return self.vision_projection(self.image_hidden(image_embeds, deterministic=deterministic))

    # -- text side ------------------------------------------------------------------------------

    def text_projection(self, cls_hidden: Array) -> Array:
        """L2norm(text_proj(x)) (normalised in float32, in the compute dtype): [..., D] -> [..., E] (x: a text
        [CLS] hidden state)."""
        return l2_normalize(self.text_proj(cls_hidden))

    def text_features(self, input_ids: Array, attention_mask: Array | None = None, *,
                      deterministic: bool = True) -> Array:
        """Text-only pass -> L2-normalised projection of the text [CLS] (position 0): [B, E]."""
        hidden = self.qformer(input_ids=input_ids, attention_mask=attention_mask,
                              deterministic=deterministic).last_hidden_state
        return self.text_projection(hidden[:, 0])

    # -- multimodal -----------------------------------------------------------------------------

    def multimodal_hidden(self, image_embeds: Array, input_ids: Array, attention_mask: Array | None = None,
                          attention_bias: Array | None = None, query_tokens: Array | None = None, *,
                          deterministic: bool = True) -> Array:
        """Image-grounded text pass: [queries; text] over the image, returns hidden states [B, Q' + T, D].

        ``query_tokens``: [Q', D] (or [B, Q', D]) tokens to use instead of the learned ``query_tokens`` (e.g.
        AdaFocal's probe tokens). The text [CLS] is at index Q'. ``attention_bias``: additive cross-attention
        bias broadcastable to [B, heads, Q', N] (AdaFocal's beta * M_B); see :class:`QFormer`.
        """
        queries = self.query_tokens[...] if query_tokens is None else query_tokens
        return self.qformer(query_embeds=queries, input_ids=input_ids, attention_mask=attention_mask,
                            image_embeds=image_embeds, attention_bias=attention_bias,
                            deterministic=deterministic).last_hidden_state

    def itm_logits(self, image_embeds: Array, input_ids: Array, attention_mask: Array | None = None, *,
                   deterministic: bool = True) -> Array:
        """Image-text matching logits [B, 2] (no-match, match): itm_head on each query output, averaged."""
        hidden = self.multimodal_hidden(image_embeds, input_ids, attention_mask, deterministic=deterministic)
        return self.itm_head(hidden[:, :self.cfg.num_query_tokens]).astype(jnp.float32).mean(axis=1)
