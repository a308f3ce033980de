"""Qwen2-VL as a retrieval embedder (LamRA's backbone), in Flax NNX: transformers 5.23
``Qwen2VLForConditionalGeneration`` semantics.

::

    image -> patches (idmr_jax.models.qwen2vl_inputs) --vision tower (2D RoPE, per-image attention)--> [N, Dv]
          --patch merger (2x2 blocks -> MLP)--> [N / 4, D] LM tokens
    input_ids --LM embeddings--> [B, T, D]; the image-token positions are overwritten, in row-major order, by the
          merged tokens of the images in order (``masked_scatter``: lh * lw tokens per image)
    M-RoPE position ids [3, B, T] (qwen2vl_inputs: text counts up; an image's tokens get (t, row, col) offsets)
    --decoder LM (Qwen2 with M-RoPE: DecoderLMConfig.mrope_section)--> final-normed hidden [B, T, D]
    --pooling (idmr_jax.models.pooling; LamRA: "before_token" at <emb>)--> L2-normalised [B, D]

Two input paths:

* fixed size (the trainer; :meth:`Qwen2VLEmbedder.vision_features`, :meth:`~Qwen2VLEmbedder.embed_from_vision`,
  :meth:`~Qwen2VLEmbedder.embed`, ...): pixels ``[B_img, S, S, 3]``, normalised NHWC, S a multiple of 28, every
  image ``(S / 28)^2`` LM tokens; position ids from ``qwen2vl_inputs.fixed_grid_rope_index`` (jittable). See
  ``qwen2vl_inputs``'s docstring for the buckets.
* packed, any sizes (the reference's dynamic resolution; ``convert verify`` and the parity tests):
  :func:`packed_inputs` builds the host-side arrays from ``grid_thw``, :meth:`Qwen2VLEmbedder.hidden_states_packed`
  runs them (jittable for one set of shapes).

The steps after the vision tower (projector, splice, LM, pooling, ``embed`` / ``logits``) are those of
:class:`idmr_jax.models.llava.ImageTokenEmbedder`, with the M-RoPE position ids added.

Without images the LM positions default to ``arange(T)`` (as the reference, whose ``get_rope_index`` only runs
when images are given); the embedder path always numbers attended tokens (0 on padding), which differs from
``arange`` by a per-row shift on left-padded rows only (rotary attention sees differences: same outputs up to
rounding). A prompt / image token count mismatch cannot raise under jit: the batch becomes NaN
(``llava.check_image_tokens`` raises eagerly).

Flax param paths: ``vision/...`` (the tower: patch_embed, blocks) and ``projector/...`` (the reference's
``visual.merger``; :mod:`idmr_jax.models.qwen2vl_vision`), ``lm/...`` (:class:`~idmr_jax.models.decoder_lm.DecoderLM`).
The names match the LLaVA embedder's, so the trainer's ``freeze_vision`` (``^vision/``) and ``train_projector``
(``^projector/``) select the same parts of both.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idmr_jax.models import pooling
from idmr_jax.models import qwen2vl_inputs as inputs
from idmr_jax.models.decoder_lm import DecoderLM, DecoderLMConfig
from idmr_jax.models.llava import ImageTokenEmbedder, splice_image_features
from idmr_jax.models.qwen2vl_vision import PatchMerger, Qwen2VLVisionConfig, Qwen2VLVisionTower


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
    """A Qwen2-VL embedder (transformers ``Qwen2VLConfig`` names where they exist).

    ``text`` is a Qwen2 :class:`DecoderLMConfig` with ``mrope_section`` set. ``video_token_id`` and the vision
    start / end ids are carried to transformers' config on export (prompts wrap each image in them).
    pooling / pooling_token_id / normalize: as :class:`idmr_jax.models.llava.LlavaConfig` (LamRA:
    ``pooling="before_token"``, ``pooling_token_id`` = ``<emb>``'s id).
    """

    vision: Qwen2VLVisionConfig
    text: DecoderLMConfig
    image_token_id: int
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    pooling: str = "last"
    pooling_token_id: int | None = None
    normalize: bool = True

    def __post_init__(self):
        if self.text.mrope_section is None:
            raise ValueError("Qwen2-VL's language model needs mrope_section (M-RoPE) in its DecoderLMConfig")
        if self.vision.hidden_size != self.text.hidden_size:
            raise ValueError(f"the merger outputs {self.vision.hidden_size} features, the LM is "
                             f"{self.text.hidden_size} wide")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocabulary ({self.text.vocab_size})")
        pooling.validate_pooling(self.pooling, self.pooling_token_id)

    @property
    def spatial_merge_size(self) -> int:
        return self.vision.spatial_merge_size

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(lh, lw) LM tokens of an image of that (valid) size."""
        gh, gw = self.vision.patch_grid(height, width)
        return gh // self.spatial_merge_size, gw // self.spatial_merge_size

    def tokens_per_image(self, image_size: int) -> int:
        """LM tokens a prompt holds per square `image_size` image (a multiple of 28): ``(S / 28)^2``."""
        lh, lw = self.token_grid(image_size, image_size)
        return lh * lw


def packed_inputs(cfg: Qwen2VLConfig, input_ids, attention_mask, grid_thw) -> dict[str, np.ndarray]:
    """Host-side arrays of a packed (variable size) batch for :meth:`Qwen2VLEmbedder.hidden_states_packed`:
    ``vision_positions [N, 2]``, ``vision_segments [N]`` and the M-RoPE ``position_ids [3, B, T]``."""
    m = cfg.spatial_merge_size
    pos, _ = inputs.rope_index(input_ids, attention_mask, grid_thw, image_token_id=cfg.image_token_id,
                               spatial_merge_size=m)
    return dict(vision_positions=inputs.vision_positions(grid_thw, m), vision_segments=inputs.vision_segments(grid_thw),
                position_ids=pos.astype(np.int32))


class Qwen2VLEmbedder(ImageTokenEmbedder):
    """Vision tower + merger + M-RoPE decoder LM, pooled into L2-normalised embeddings; see the module docstring."""

    def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = Qwen2VLVisionTower(cfg.vision, rngs=rngs)
        self.projector = PatchMerger(cfg.vision, rngs=rngs)
        self.lm = DecoderLM(cfg.text, rngs=rngs)

    # -- images --------------------------------------------------------------------------------------

    def vision_features(self, pixels: jax.Array) -> jax.Array:
        """The vision tower's output before the merger ``[B_img, (S/14)^2, Dv]`` (block-major patch order) of
        normalised square NHWC pixels ``[B_img, S, S, C]``."""
        v = self.cfg.vision
        _, h, w, _ = pixels.shape
        patches = inputs.patchify_fixed(pixels, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                        temporal_patch_size=v.temporal_patch_size)
        gh, gw = v.patch_grid(h, w)
        positions = jnp.asarray(inputs.grid_positions(gh, gw, v.spatial_merge_size))[None]
        return self.vision(patches, positions)

    def _square_token_grid(self, num_patches: int) -> tuple[int, int]:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"{num_patches} patches per image is not a square grid (fixed square images only)")
        m = self.cfg.spatial_merge_size
        return side // m, side // m

    def _fixed_positions(self, input_ids, attention_mask, grid: tuple[int, int]) -> jax.Array:
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        return inputs.fixed_grid_rope_index(input_ids, mask, image_token_id=self.cfg.image_token_id, grid=grid)

    def vision_position_ids(self, input_ids: jax.Array, attention_mask: jax.Array, features: jax.Array
                            ) -> jax.Array:
        """The M-RoPE position ids ``[3, B, T]`` of prompts whose images gave `features` (square, one size)."""
        return self._fixed_positions(input_ids, attention_mask, self._square_token_grid(features.shape[1]))

    # -- fixed-size sequences -----------------------------------------------------------------------

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      pixels: jax.Array | None = None, *, image_valid: jax.Array | None = None,
                      deterministic: bool = True) -> jax.Array:
        """The LM's final-normed hidden states ``[B, T, D]`` for same-size square images (`image_valid` [B_img]:
        which pixel rows are real images, as ``llava.splice_image_features``). The images may be non-square here
        as long as they all have one size."""
        embeds = self.input_embeddings(input_ids, pixels, image_valid)
        positions = None
        if pixels is not None:
            positions = self._fixed_positions(input_ids, attention_mask, self.cfg.token_grid(*pixels.shape[1:3]))
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                       deterministic=deterministic)

    # -- packed, variable sizes ---------------------------------------------------------------------

    def hidden_states_packed(self, input_ids: jax.Array, attention_mask: jax.Array | None, patches: jax.Array | None,
                             vision_positions: jax.Array | None, vision_segments: jax.Array | None,
                             position_ids: jax.Array | None, *, deterministic: bool = True) -> jax.Array:
        """Hidden states ``[B, T, D]`` of a batch whose images have any sizes: `patches` ``[N, C*T*P*P]`` packed as
        ``qwen2vl_inputs.patchify_images``, the other arrays from :func:`packed_inputs` (None without images:
        ``arange`` positions)."""
        embeds = self.lm.embed(input_ids)
        if patches is not None:
            features = self.vision(patches[None], vision_positions[None], vision_segments[None])
            embeds = splice_image_features(embeds, input_ids, self.cfg.image_token_id, self.projector(features))
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       deterministic=deterministic)

    def hidden_states_for_grids(self, input_ids, attention_mask, patches, grid_thw) -> jax.Array:
        """:meth:`hidden_states_packed` (jitted, inference) from the reference's inputs: packed `patches` and
        ``grid_thw [n, 3]`` (host-side arrays: call it outside jit, as :func:`packed_inputs` reads the grids)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        if patches is None:
            return _packed_hidden(self, ids, mask, None, None, None, None)
        arrays = packed_inputs(self.cfg, np.asarray(input_ids), None if mask is None else np.asarray(mask), grid_thw)
        names = ("vision_positions", "vision_segments", "position_ids")
        return _packed_hidden(self, ids, mask, jnp.asarray(patches), *(jnp.asarray(arrays[k]) for k in names))


@nnx.jit
def _packed_hidden(model: Qwen2VLEmbedder, ids, mask, patches, vision_positions, vision_segments, position_ids):
    return model.hidden_states_packed(ids, mask, patches, vision_positions, vision_segments, position_ids)
