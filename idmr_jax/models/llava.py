"""LLaVA-style vision-language model as a retrieval embedder (and captioner), in Flax NNX.

The assembly of transformers 5's ``LlavaForConditionalGeneration``::

    pixels --vision encoder--> hidden_states[vision_feature_layer]  (CLIP ViT; "default" strategy drops the CLS)
           --projector: linear_1 -> act -> linear_2--> image features [B_img, N, D]
    input_ids --LM embeddings--> [B, T, D]; the image-token positions are overwritten, in row-major order, by the
           image features flattened over the images (``masked_scatter``: the prompt holds exactly N image tokens
           per image)
    --decoder LM--> final-normed hidden [B, T, D] --pooling (idmr_jax.models.pooling)--> L2-normalised [B, D]

Inputs may be text only (``pixels=None``), or a batch mixing rows with and without images: the features of all
images fill the image tokens of all rows in order. For fixed-shape jitted batches, ``image_valid`` [B_img] marks
which pixel rows are real images: padded (False) rows are skipped, so text-only rows can sit next to placeholder
pixels. When the number of image tokens does not equal the number of image features, the call cannot raise under
jit; the hidden states of the whole batch become NaN instead (:func:`check_image_tokens` raises eagerly).

Vision: a CLIP-style :class:`~idmr_jax.models.vit.VisionTransformer` (``vision_feature_layer``: transformers'
``hidden_states`` index, -2 by default = the second-to-last block's output, no ``post_layernorm``; a tuple
concatenates several layers along features), or any encoder of :func:`idmr_jax.models.vision.build_vision_encoder`
(e.g. the laptop demo's EfficientNet-Lite0) whose output tokens are used directly (``vision_feature_layer=None``).

:class:`ImageTokenEmbedder` holds the steps after the vision tower (projector, splice, LM, pooling, logits), which
the InternVL and Qwen2-VL embedders (``idmr_jax.models.internvl`` / ``qwen2vl``) share with this one.

Flax param paths: ``vision/...``, ``projector/linear_1/{kernel,bias}`` [Dv*n_layers, D],
``projector/linear_2/{kernel,bias}`` [D, D], ``lm/...`` (:class:`~idmr_jax.models.decoder_lm.DecoderLM`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models import pooling
from idmr_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from idmr_jax.models.vision import VisionConfig, build_vision_encoder, vision_grid
from idmr_jax.models.vit import ViTConfig
from idmr_jax.sharding import constrain

STRATEGIES = ("default", "full")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """A LLaVA embedder. Field names follow transformers' ``LlavaConfig`` where they exist there.

    pooling / pooling_token_id / normalize: how :meth:`LlavaEmbedder.embed` pools (see
    :mod:`idmr_jax.models.pooling`; ``pooling_token_id`` is the EOS id for "eos" and ``<emb>``'s id for
    "before_token"). ``image_seq_length`` is only carried to transformers' config on export (their processor
    inserts that many image tokens). ``projector_dtype`` / ``projector_param_dtype``: the projector's compute and
    storage dtypes (None: the LM's).
    """

    vision: VisionConfig
    text: DecoderLMConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] | None = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    image_seq_length: int = 576
    pooling: str = "last"
    pooling_token_id: int | None = None
    normalize: bool = True
    projector_dtype: str | None = None
    projector_param_dtype: str | None = None

    def __post_init__(self):
        if self.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, "
                             f"got {self.vision_feature_select_strategy!r}")
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        if isinstance(self.vision, ViTConfig):
            if self.vision_feature_layer is None:
                raise ValueError("a ViT vision tower needs vision_feature_layer (transformers' default is -2)")
        elif self.vision_feature_layer is not None:
            raise ValueError(f"vision_feature_layer={self.vision_feature_layer} selects ViT hidden states; "
                             f"{type(self.vision).__name__} gives its output tokens only: set it to None")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
        pooling.validate_pooling(self.pooling, self.pooling_token_id)
        L.activation(self.projector_hidden_act)

    @property
    def num_feature_layers(self) -> int:
        layer = self.vision_feature_layer
        return len(layer) if isinstance(layer, tuple) else 1

    def image_tokens(self, grid: tuple[int, int]) -> int:
        """Image tokens per image for a vision token grid (gh, gw): gh*gw, plus the CLS with strategy "full"."""
        return grid[0] * grid[1] + (self.vision_feature_select_strategy == "full")

    def tokens_per_image(self, image_size: int) -> int:
        """Image tokens a prompt holds per square `image_size` image (the embedder contract's question)."""
        return self.image_tokens(vision_grid(self.vision, image_size))


class Projector(nnx.Module):
    """LLaVA's multimodal projector: linear_1 -> act -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int, act: str, use_bias: bool, *, dtype, param_dtype, precision,
                 rngs: nnx.Rngs):
        self.act = act
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.linear_1 = L.Dense(in_dim, out_dim, in_axes=("vision_embed",), out_axes=("mlp",), **kw)
        self.linear_2 = L.Dense(out_dim, out_dim, in_axes=("mlp",), out_axes=("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(L.activation(self.act)(self.linear_1(x)))


def splice_image_features(embeds: jax.Array, input_ids: jax.Array, image_token_id: int, features: jax.Array,
                          image_valid: jax.Array | None = None) -> jax.Array:
    """``inputs_embeds.masked_scatter(input_ids == image_token_id, features)`` for ``features [B_img, N, D]``.

    The k-th image-token position (row-major over ``[B, T]``) receives row k of the features of the valid images
    flattened to ``[n_valid * N, D]``. A count mismatch makes the whole result NaN (see the module docstring).
    """
    b_img, n, d = features.shape
    if image_valid is not None:
        # Stable sort: valid images first, in their original order; the invalid ones are never reached below.
        valid = jnp.asarray(image_valid, bool)
        features = features[jnp.argsort(~valid, stable=True)]
        n_features = jnp.sum(valid) * n
    else:
        n_features = b_img * n
    flat = features.reshape(b_img * n, d).astype(embeds.dtype)
    is_image = input_ids == image_token_id
    rank = jnp.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    gathered = jnp.take(flat, jnp.clip(rank, 0, b_img * n - 1), axis=0)
    out = jnp.where(is_image[..., None], gathered, embeds)
    ok = jnp.sum(is_image) == n_features
    return jnp.where(ok, out, jnp.asarray(jnp.nan, out.dtype))


def splice_row_features(embeds: jax.Array, input_ids: jax.Array, image_token_id: int, features: jax.Array,
                        has_image: jax.Array) -> jax.Array:
    """Row-local `splice_image_features` for a batch that mixes rows with and without an image.

    ``features [B, N, D]`` are each row's own image features (anything for a row without an image): row r's k-th
    image token receives ``features[r, k]``; rows without an image keep their token embeddings. Nothing crosses
    rows, so a batch-sharded splice needs no communication. A row whose image-token count is not
    ``has_image[r] * N`` becomes NaN (a prompt / image mismatch, as `splice_image_features` reports it).
    """
    n = features.shape[1]
    is_image = input_ids == image_token_id
    rank = jnp.cumsum(is_image, axis=1) - 1
    gathered = jnp.take_along_axis(features.astype(embeds.dtype), jnp.clip(rank, 0, n - 1)[..., None], axis=1)
    out = jnp.where(is_image[..., None], gathered, embeds)
    ok = jnp.sum(is_image, axis=1) == jnp.where(jnp.asarray(has_image, bool), n, 0)
    return jnp.where(ok[:, None, None], out, jnp.asarray(jnp.nan, out.dtype))


def check_image_tokens(input_ids, image_token_id: int, num_images: int, tokens_per_image: int, *,
                       what: str = "batch") -> None:
    """Eagerly raises ``ValueError`` when the prompts' image tokens do not match the image features
    (transformers raises the same at run time; under jit the port can only turn the batch into NaN)."""
    n_tokens = int(np.sum(np.asarray(input_ids) == image_token_id))
    if n_tokens != num_images * tokens_per_image:
        raise ValueError(f"{what}: {n_tokens} image tokens (id {image_token_id}) in the prompts, but {num_images} "
                         f"image(s) x {tokens_per_image} features = {num_images * tokens_per_image}")


class ImageTokenEmbedder(nnx.Module):
    """The steps the MLLM embedders (LLaVA, InternVL, Qwen2-VL) share after their vision tower: project the vision
    features, splice them in at the prompt's image tokens, run the decoder LM, pool.

    A subclass sets ``self.cfg`` (``image_token_id``, ``pooling``, ``pooling_token_id``, ``normalize``),
    ``self.projector`` and ``self.lm`` (a :class:`~idmr_jax.models.decoder_lm.DecoderLM`), and defines
    ``vision_features(pixels)``; one whose LM needs position ids of its own (Qwen2-VL's M-RoPE) overrides
    :meth:`vision_position_ids` and :meth:`hidden_states`.
    """

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """Projected image features [B_img, N, D] (transformers' ``get_image_features``)."""
        return constrain(self.projector(self.vision_features(pixels)), ("batch", "length", "embed"))

    def vision_position_ids(self, input_ids: jax.Array, attention_mask: jax.Array, features: jax.Array
                            ) -> jax.Array | None:
        """The LM position ids for :meth:`embed_from_vision` (None: the LM's default numbering)."""
        del input_ids, attention_mask, features
        return None

    def embed_from_vision(self, features: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, *,
                          has_image: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """:meth:`embed` from precomputed ``vision_features`` (the steps after the vision tower; the embedder
        contract of ``idmr_jax.tasks.universal.model``). Without `has_image`, `features` are the images of all rows
        in row-major order; with it, ``features [B, N, Dv]`` are each row's own (anything where ``has_image`` is
        False; those rows' prompts hold no image token)."""
        image = constrain(self.projector(features), ("batch", "length", "embed"))
        embeds = self.lm.embed(input_ids)
        if has_image is None:
            embeds = splice_image_features(embeds, input_ids, self.cfg.image_token_id, image)
        else:
            embeds = splice_row_features(embeds, input_ids, self.cfg.image_token_id, image, has_image)
        hidden = self.lm(inputs_embeds=embeds, attention_mask=attention_mask,
                         position_ids=self.vision_position_ids(input_ids, attention_mask, features),
                         deterministic=deterministic)
        return self.pool_hidden(hidden, attention_mask, input_ids)

    def input_embeddings(self, input_ids: jax.Array, pixels: jax.Array | None = None,
                         image_valid: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the image features spliced in at the image tokens (`image_valid` [B_img]: which
        pixel rows of a fixed-shape batch are real images)."""
        embeds = self.lm.embed(input_ids)
        if pixels is None:
            return embeds
        return splice_image_features(embeds, input_ids, self.cfg.image_token_id, self.image_features(pixels),
                                     image_valid)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      pixels: jax.Array | None = None, *, position_ids: jax.Array | None = None,
                      image_valid: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """The LM's final-normed hidden states [B, T, D] (transformers' ``last_hidden_state``)."""
        embeds = self.input_embeddings(input_ids, pixels, image_valid)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       deterministic=deterministic)

    def pool_hidden(self, hidden: jax.Array, attention_mask: jax.Array, input_ids: jax.Array) -> jax.Array:
        """``cfg.pooling`` of the hidden states (L2-normalised with ``cfg.normalize``) [B, D]."""
        return pooling.pool(hidden, attention_mask, input_ids, method=self.cfg.pooling,
                            token_id=self.cfg.pooling_token_id, normalize=self.cfg.normalize)

    def embed(self, input_ids: jax.Array, attention_mask: jax.Array, pixels: jax.Array | None = None,
              **kw) -> jax.Array:
        """Pooled (and, with ``cfg.normalize``, L2-normalised) embeddings [B, D]; `kw` as :meth:`hidden_states`
        (``image_valid``, ``deterministic``, ...)."""
        return self.pool_hidden(self.hidden_states(input_ids, attention_mask, pixels, **kw), attention_mask, input_ids)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixels: jax.Array | None = None, **kw
                 ) -> jax.Array:
        """Same as :meth:`embed`."""
        return self.embed(input_ids, attention_mask, pixels, **kw)

    def logits(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixels: jax.Array | None = None, **kw) -> jax.Array:
        """Next-token logits [B, T, V] (the ``...ForConditionalGeneration(...).logits`` of the reference)."""
        return self.lm.logits(self.hidden_states(input_ids, attention_mask, pixels, **kw))


class LlavaEmbedder(ImageTokenEmbedder):
    """Vision encoder + projector + decoder LM, pooled into L2-normalised embeddings; see the module docstring."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = build_vision_encoder(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.vision.width * cfg.num_feature_layers, cfg.text.hidden_size,
                                   cfg.projector_hidden_act, cfg.multimodal_projector_bias,
                                   dtype=jnp.dtype(cfg.projector_dtype or cfg.text.dtype),
                                   param_dtype=jnp.dtype(cfg.projector_param_dtype or cfg.text.param_dtype),
                                   precision=getattr(cfg.text, "precision", None), rngs=rngs)
        self.lm = DecoderLM(cfg.text, rngs=rngs)

    # -- images ------------------------------------------------------------------------------------

    def vision_features(self, pixels: jax.Array) -> jax.Array:
        """The selected vision hidden states [B_img, N, Dv * n_layers] (before the projector)."""
        cfg = self.cfg
        if isinstance(cfg.vision, ViTConfig):
            layer = cfg.vision_feature_layer
            states = self.vision.hidden_states(pixels, layer)
        else:
            states = (self.vision(pixels).tokens,)
        if cfg.vision_feature_select_strategy == "default":
            states = tuple(s[:, 1:] for s in states)  # drop the CLS token
        return states[0] if len(states) == 1 else jnp.concatenate(states, axis=-1)

    def generate_greedy(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                        pixels: jax.Array | None = None, *, max_new_tokens: int, eos_token_id: int | None = None,
                        pad_token_id: int | None = None, image_valid: jax.Array | None = None) -> jax.Array:
        """Greedy decoding from (image +) text prompts: the ``[B, max_new_tokens]`` new token ids, as
        transformers' ``generate(do_sample=False)`` (the MLLM captioner of IDMR's data synthesis). Prompts are
        left-padded; see :meth:`idmr_jax.models.decoder_lm.DecoderLM.generate_greedy`. Call it outside jit."""
        embeds = _input_embeddings(self, jnp.asarray(input_ids), pixels, image_valid)
        return self.lm.generate_greedy(None, attention_mask, max_new_tokens, inputs_embeds=embeds,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@nnx.jit
def _input_embeddings(model: LlavaEmbedder, input_ids, pixels, image_valid):
    return model.input_embeddings(input_ids, pixels, image_valid)
