"""CLIP image-text model (transformers ``CLIPModel``) in Flax NNX, and the CLIP score used by IDMR's data filter.

``vision`` (:class:`~idmr_jax.models.vit.VisionTransformer`, style "clip") -> ``pooled`` (post_layernorm'd CLS)
-> ``visual_projection``; ``text`` (:class:`~idmr_jax.models.clip_text.CLIPTextTransformer`) -> ``pooled`` (EOS
token) -> ``text_projection``; ``logit_scale`` (a scalar, the log of the inverse temperature). IDMR keeps a
detection crop when the cosine similarity of its image features with "a photo of a {category}" exceeds 0.2
(:func:`clip_score`). Loading a transformers checkpoint: :func:`idmr_jax.weights.clip.load_hf_clip`.

Flax param paths: ``vision/...`` (idmr_jax.models.vit), ``text/...`` (idmr_jax.models.clip_text),
``visual_projection/kernel`` [Dv, E], ``text_projection/kernel`` [Dt, E], ``logit_scale`` [].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from idmr_jax.models.pooling import l2_normalize
from idmr_jax.models.vit import VisionTransformer, ViTConfig

# transformers' CLIPConfig default: log(1 / 0.07).
LOGIT_SCALE_INIT = 2.6592


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP pair: a CLIP-style ViT, a text tower and the shared projection width."""

    vision: ViTConfig
    text: CLIPTextConfig
    projection_dim: int = 512
    logit_scale_init: float = LOGIT_SCALE_INIT

    def __post_init__(self):
        if self.vision.style != "clip":
            raise ValueError(f"CLIP needs a 'clip'-style ViT, got style={self.vision.style!r}")


class CLIPModel(nnx.Module):
    """Both CLIP towers with their projections; see the module docstring."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision, rngs=rngs)
        self.text = CLIPTextTransformer(cfg.text, rngs=rngs)

        def proj(width: int, axis: str) -> L.Dense:
            return L.Dense(width, cfg.projection_dim, in_axes=(axis,), out_axes=("proj",), use_bias=False,
                           dtype=jnp.dtype(cfg.vision.dtype), param_dtype=jnp.dtype(cfg.vision.param_dtype),
                           precision=cfg.vision.precision, rngs=rngs)

        self.visual_projection = proj(cfg.vision.width, "vision_embed")
        self.text_projection = proj(cfg.text.width, "embed")
        self.logit_scale = L.make_param(rngs, nnx.initializers.constant(cfg.logit_scale_init), (), (), jnp.float32)

    def image_features(self, pixels: jax.Array, *, normalize: bool = False) -> jax.Array:
        """``CLIPModel.get_image_features``: projected pooled image features [B, E] (L2-normalised if asked).
        `pixels` are NHWC, normalised with CLIP's mean/std."""
        feats = self.visual_projection(self.vision(pixels).pooled)
        return l2_normalize(feats) if normalize else feats

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      normalize: bool = False) -> jax.Array:
        """``CLIPModel.get_text_features``: projected EOS-token text features [B, E] (L2-normalised if asked)."""
        feats = self.text_projection(self.text(input_ids, attention_mask).pooled)
        return l2_normalize(feats) if normalize else feats

    def logits_per_image(self, pixels: jax.Array, input_ids: jax.Array,
                         attention_mask: jax.Array | None = None) -> jax.Array:
        """``CLIPModel(...).logits_per_image``: exp(logit_scale) * cosine similarities [B_img, B_txt]."""
        img = self.image_features(pixels, normalize=True).astype(jnp.float32)
        txt = self.text_features(input_ids, attention_mask, normalize=True).astype(jnp.float32)
        return jnp.exp(self.logit_scale[...]) * img @ txt.T

    def __call__(self, pixels: jax.Array, input_ids: jax.Array, attention_mask: jax.Array | None = None
                 ) -> jax.Array:
        """Paired CLIP score: the cosine similarity of image i with text i, [B] (see :func:`clip_score`)."""
        img = self.image_features(pixels, normalize=True).astype(jnp.float32)
        txt = self.text_features(input_ids, attention_mask, normalize=True).astype(jnp.float32)
        return jnp.sum(img * txt, axis=-1)


def clip_score(model: CLIPModel, pixels: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Cosine similarity between image i and text i, [B] float32 (IDMR's crop filter keeps scores > 0.2 for the
    prompt "a photo of a {category}")."""
    return model(pixels, input_ids, attention_mask)

