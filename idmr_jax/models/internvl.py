"""InternVL2.5 (transformers 5.23 ``InternVLForConditionalGeneration``) as a retrieval embedder, in Flax NNX: IDMR's
backbone.

The assembly::

    tiles [B_tiles, S, S, 3] (dynamic tiling, idmr_jax.data.image_tiling: an image is 1..N tiles + a thumbnail)
      --InternViT (idmr_jax.models.internvit)--> vision_feature_layer's hidden state [B_tiles, 1 + g*g, Dv]
      --"default" strategy drops the CLS--> [B_tiles, g*g, Dv] --reshape to the g x g grid-->
      --pixel shuffle (downsample_ratio 0.5: each 2x2 neighbourhood becomes one token of 4*Dv channels, with
        exactly the reference's reshape/transposes)--> [B_tiles, (g/2)^2, 4*Dv]          (vision_features)
      --projector: LayerNorm -> linear_1 -> act -> linear_2--> [B_tiles, (g/2)^2, D]
    input_ids --LM embeddings--> [B, T, D]; the image-token positions are overwritten, in row-major order, by the
      features of all tiles flattened (``masked_scatter``, :func:`idmr_jax.models.llava.splice_image_features`):
      an image of n tiles owns n * (g/2)^2 consecutive image tokens, its tiles in the tiling order
    --Qwen2 decoder LM (idmr_jax.models.decoder_lm)--> final-normed hidden [B, T, D]
    --pooling (idmr_jax.models.pooling; IDMR pools the last token)--> L2-normalised [B, D]

The embedder contract of the shared trainer (as :class:`idmr_jax.models.llava.LlavaEmbedder`; all but
``vision_features`` come from :class:`idmr_jax.models.llava.ImageTokenEmbedder`):
:meth:`InternVLEmbedder.vision_features`, :meth:`InternVLEmbedder.embed_from_vision` (all images row-major, or with
``has_image`` one image per row, :func:`idmr_jax.models.llava.splice_row_features`), :meth:`~InternVLEmbedder.embed`,
:meth:`~InternVLEmbedder.hidden_states`, :meth:`~InternVLEmbedder.logits`; ``cfg.tokens_per_image(S)`` is the
token count of one S x S tile. A token / feature count mismatch turns the batch into NaN under jit
(:func:`idmr_jax.models.llava.check_image_tokens` raises eagerly).

Flax param paths: ``vision/...`` (:class:`~idmr_jax.models.internvit.InternViT`),
``projector/layer_norm/{scale,bias}`` [4*Dv], ``projector/linear_1/{kernel,bias}`` [4*Dv, D],
``projector/linear_2/{kernel,bias}`` [D, D], ``lm/...`` (:class:`~idmr_jax.models.decoder_lm.DecoderLM`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.data.image_ops import IMAGENET_MEAN, IMAGENET_STD
from idmr_jax.models import layers as L
from idmr_jax.models import pooling
from idmr_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from idmr_jax.models.internvit import InternViT, InternViTConfig
from idmr_jax.models.llava import ImageTokenEmbedder

# Only "default" (drop the CLS): transformers' "full" keeps the CLS, and 1 + g*g tokens do not reshape to the
# square grid the pixel shuffle needs (the reference fails there too).
STRATEGIES = ("default",)
PROJECTOR_LN_EPS = 1e-5
  # torch nn.LayerNorm's default: the projector's norm is built without an eps


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
    """An InternVL embedder. Field names follow transformers' ``InternVLConfig`` where they exist there.

    ``vision_feature_layer``: -1 = the tower's ``last_hidden_state``, else its ``hidden_states[k]``.
    ``input_mean`` / ``input_std``: the normalisation the caller applied to [0, 1] pixels when it is not InternVL's
    own (ImageNet, `IMAGENET_MEAN` / `IMAGENET_STD`); the tower then re-normalises them first. The shared trainer's
    pipelines normalise with CLIP's statistics and set these (None: ImageNet-normalised input, as the reference).
    ``image_seq_length`` is only carried to transformers' config on export. pooling / pooling_token_id / normalize
    as :class:`idmr_jax.models.llava.LlavaConfig` (IDMR: "last"). ``projector_dtype`` /
    ``projector_param_dtype``: the projector's compute and storage dtypes (None: the LM's).
    """

    vision: InternViTConfig
    text: DecoderLMConfig
    image_token_id: int
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    image_seq_length: int = 256
    pooling: str = "last"
    pooling_token_id: int | None = None
    normalize: bool = True
    projector_dtype: str | None = None
    projector_param_dtype: str | None = None
    input_mean: tuple[float, float, float] | None = None
    input_std: tuple[float, float, float] | None = None

    def __post_init__(self):
        for name in ("input_mean", "input_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("give input_mean and input_std together (or neither: ImageNet-normalised pixels)")
        if self.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, "
                             f"got {self.vision_feature_select_strategy!r}")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
        if self.shuffle_factor * self.downsample_ratio != 1:
            raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}")
        pooling.validate_pooling(self.pooling, self.pooling_token_id)
        L.activation(self.projector_hidden_act)

    @property
    def shuffle_factor(self) -> int:
        """k = 1 / downsample_ratio: k x k vision tokens become one."""
        return int(round(1 / self.downsample_ratio))

    @property
    def feature_dim(self) -> int:
        """Channels of :meth:`InternVLEmbedder.vision_features` (the projector's input): Dv * k^2."""
        return self.vision.width * self.shuffle_factor ** 2

    def tokens_per_image(self, image_size: int) -> int:
        """Image tokens one `image_size` x `image_size` tile fills (the embedder contract's question)."""
        g = image_size // self.vision.patch_size
        if g % self.shuffle_factor:
            raise ValueError(f"a {g}x{g} patch grid is not divisible by the shuffle factor {self.shuffle_factor}")
        return (g // self.shuffle_factor) ** 2


def pixel_shuffle(features: jax.Array, ratio: float) -> jax.Array:
    """transformers' ``InternVLModel.pixel_shuffle`` on ``[B, W, H, C]`` (its names): ``[B, W*r, H*r, C/r^2]``,
    the same reshape / transpose sequence (any other order mixes the channels differently)."""
    b, w, h, c = features.shape
    k = int(round(1 / ratio))
    if w % k or h % k:
        raise ValueError(f"feature grid {w}x{h} is not divisible by {k}")
    x = features.reshape(b, w, h // k, c * k)
    x = x.transpose(0, 2, 1, 3).reshape(b, h // k, w // k, c * k * k)
    return x.transpose(0, 2, 1, 3)


class Projector(nnx.Module):
    """InternVL's multimodal projector: LayerNorm -> linear_1 -> act -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int, act: str, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
        self.act = act
        self.layer_norm = L.LayerNorm(in_dim, eps=PROJECTOR_LN_EPS, axes=("vision_embed",), dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)
        kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.linear_1 = L.Dense(in_dim, out_dim, in_axes=("vision_embed",), out_axes=("mlp",), **kw)
        self.linear_2 = L.Dense(out_dim, out_dim, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(L.activation(self.act)(self.linear_1(self.layer_norm(x))))


class InternVLEmbedder(ImageTokenEmbedder):
    """InternViT + pixel shuffle + projector + decoder LM, pooled into embeddings; see the module docstring."""

    def __init__(self, cfg: InternVLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = InternViT(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.feature_dim, cfg.text.hidden_size, cfg.projector_hidden_act,
                                   dtype=jnp.dtype(cfg.projector_dtype or cfg.text.dtype),
                                   param_dtype=jnp.dtype(cfg.projector_param_dtype or cfg.text.param_dtype),
                                   precision=cfg.text.precision, rngs=rngs)
        self.lm = DecoderLM(cfg.text, rngs=rngs)

    # -- images ------------------------------------------------------------------------------------

    def vision_features(self, pixels: jax.Array) -> jax.Array:
        """Pixel-shuffled vision features [B_tiles, (g/k)^2, Dv*k^2] of NHWC tiles (before the projector)."""
        cfg = self.cfg
        if cfg.input_mean is not None:  # the caller's normalisation -> InternViT's (ImageNet)
            scale = jnp.asarray(cfg.input_std, jnp.float32) / jnp.asarray(IMAGENET_STD, jnp.float32)
            shift = (jnp.asarray(cfg.input_mean, jnp.float32) - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(
                IMAGENET_STD, jnp.float32)
            pixels = (pixels.astype(jnp.float32) * scale + shift).astype(pixels.dtype)
        x = self.vision.features(pixels, cfg.vision_feature_layer)
        x = x[:, 1:]  # the "default" strategy: drop the CLS token
        b, n, c = x.shape
        g = int(round(n ** 0.5))
        if g * g != n:
            raise ValueError(f"{n} vision tokens do not form a square grid (square tiles only)")
        x = pixel_shuffle(x.reshape(b, g, g, c), cfg.downsample_ratio)
        return x.reshape(b, -1, x.shape[-1])
