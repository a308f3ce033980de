"""AdaFocal: BLIP-2 with the Context-Aware Attention Modulator (CAAM) for object-anchored CIR.

Query branch (released code, ``Blip2QformerOacirAdaFocal``):
  1. probe pass: K learnable probe tokens replace the query tokens in a full Q-Former pass over the reference
     image tokens and the modification text, with no bias;
  2. the Contextual Reasoning Module turns the K probe outputs into beta >= 0 (scalar, or one per query token);
  3. attention activation: a second pass with the query tokens adds ``beta * M_B`` to the logits of every
     cross-attention layer (M_B = the box rasterised on the patch grid, CLS never set, zero without a box);
  4. f_q = L2norm(text_proj(hidden[:, num_query_tokens])), the text [CLS] right after the queries.
Target branch: image-only Q-Former pass -> L2norm(vision_proj) -> [B, Q, E]; similarity = max over Q.

``beta_mode`` selects the paper's baselines: "adaptive" (CAAM), "fixed" (a hand-set beta) or "none"
(the standard CIR baseline: no bias at all, which equals beta = 0 bit for bit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models.blip2 import Blip2, Blip2Config
from idmr_jax.models.crm import ContextualReasoningModule, CRMConfig
from idmr_jax.models.vision import vision_grid

BETA_MODES = ("adaptive", "fixed", "none")


@dataclasses.dataclass(frozen=True)
class AdaFocalConfig:
    blip2: Blip2Config
    crm: CRMConfig
    beta_mode: str = "adaptive"
    fixed_beta: float = 0.0
    image_size: int = 224  # square input side; with the encoder it fixes the patch grid boxes are drawn on

    def __post_init__(self):
        if self.beta_mode not in BETA_MODES:
            raise ValueError(f"beta_mode must be one of {BETA_MODES}, got {self.beta_mode!r}")
        if not self.fixed_beta >= 0:  # beta is a softplus output; a negative one would push attention off the box
            raise ValueError(f"fixed_beta must be >= 0, got {self.fixed_beta}")
        if self.crm.num_outputs not in (1, self.blip2.num_query_tokens):
            raise ValueError(f"CRM outputs {self.crm.num_outputs}: use 1 (scalar beta) or the number of query "
                             f"tokens {self.blip2.num_query_tokens} (vector beta)")


def grid(cfg: AdaFocalConfig) -> tuple[int, int]:
    """The (gh, gw) patch grid of the vision encoder at ``cfg.image_size`` (M_B is rasterised on it)."""
    return vision_grid(cfg.blip2.vision, cfg.image_size)


def attention_bias(beta: jax.Array, box_mask: jax.Array) -> jax.Array:
    """``beta * M_B`` shaped for the cross-attention logits [B, heads, queries, image_tokens].

    beta [B, 1] (scalar) gives [B, 1, 1, N]; beta [B, Q] (vector) gives [B, 1, Q, N].
    """
    return beta[:, None, :, None] * box_mask[:, None, None, :].astype(beta.dtype)


class AdaFocal(nnx.Module):
    """The AdaFocal retriever: `query_features` and `target_features` share one BLIP-2."""

    def __init__(self, cfg: AdaFocalConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.blip2 = Blip2(cfg.blip2, rngs=rngs)
        if cfg.beta_mode == "adaptive":
            hidden = cfg.blip2.qformer.hidden_size
            init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))
            self.probe_tokens = nnx.Param(init(rngs.params(), (cfg.crm.num_probes, hidden),
                                               jnp.dtype(cfg.blip2.qformer.param_dtype)))
            self.crm = ContextualReasoningModule(cfg.crm, rngs=rngs)

    @property
    def temp(self) -> jax.Array:
        return self.blip2.temp[...]

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Frozen-ViT tokens after ``ln_vision``, [B, N, D_vision]."""
        embeds, _ = self.blip2.encode_image(pixels)
        return embeds

    def vision_tokens(self, pixels: jax.Array) -> jax.Array:
        """The vision encoder's own tokens, before ``ln_vision``, [B, N, D_vision] (in its compute dtype): what a
        frozen, unaugmented encoder gives once per image, so they can be cached (`embed_tokens` continues)."""
        return self.blip2.vision(pixels).tokens

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """``encode_image`` from `vision_tokens`' output: ``ln_vision``, [B, N, D_vision]."""
        return self.blip2.embed_vision_tokens(tokens)

    def beta(self, image_embeds, input_ids, attention_mask, *, deterministic: bool = True) -> jax.Array:
        """The modulation strength, [B, 1] (scalar) or [B, Q] (vector), >= 0."""
        b = image_embeds.shape[0]
        width = self.cfg.crm.num_outputs
        if self.cfg.beta_mode == "none":
            return jnp.zeros((b, width), jnp.float32)
        if self.cfg.beta_mode == "fixed":
            return jnp.full((b, width), self.cfg.fixed_beta, jnp.float32)
        hidden = self.blip2.multimodal_hidden(image_embeds, input_ids, attention_mask,
                                              query_tokens=self.probe_tokens[...], deterministic=deterministic)
        return self.crm(hidden[:, :self.cfg.crm.num_probes], deterministic=deterministic)

    def query_features(self, image_embeds, input_ids, attention_mask, box_mask, *,
                       deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """(f_q [B, E] L2-normalised, beta) for reference image tokens, text and box mask [B, N]."""
        beta = self.beta(image_embeds, input_ids, attention_mask, deterministic=deterministic)
        bias = None if self.cfg.beta_mode == "none" else attention_bias(beta, box_mask)
        hidden = self.blip2.multimodal_hidden(image_embeds, input_ids, attention_mask, attention_bias=bias,
                                              deterministic=deterministic)
        cls = hidden[:, self.cfg.blip2.num_query_tokens]
        return self.blip2.text_projection(cls), beta

    def target_features(self, image_embeds, *, deterministic: bool = True) -> jax.Array:
        """[B, Q, E] L2-normalised target tokens from the image-only pass."""
        return self.blip2.image_features(image_embeds, deterministic=deterministic)


def similarity(query: jax.Array, targets: jax.Array) -> jax.Array:
    """AdaFocal's score: max over the target tokens of the dot product, [Nq, Nt]."""
    return jnp.einsum("qe,tke->qtk", query, targets, preferred_element_type=jnp.float32).max(-1)
