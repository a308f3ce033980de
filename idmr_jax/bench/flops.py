"""Model FLOPs of an AdaFocal train step, counted analytically from the config (matmuls only, 2 per MAC).

The usual MFU convention: FLOPs of the matmuls (dense layers, attention scores and mixing, the loss's
similarity), not of elementwise work (norms, softmax, GELU), and no recomputation (remat adds executed FLOPs,
not model FLOPs). A trainable part costs 3x its forward (forward, gradient w.r.t. inputs, gradient w.r.t.
weights); the frozen ViT costs 1x (it runs forward only; its output's ``ln_vision`` trains, so no gradient flows
into it). Two images per example: the reference (query branch) and the target (target branch).
"""

from __future__ import annotations

from idmr_jax.models.adafocal import AdaFocalConfig
from idmr_jax.models.vit import ViTConfig


def vit_forward(cfg: ViTConfig, image_size: int) -> int:
    """Forward FLOPs of the ViT on one image."""
    g = image_size // cfg.patch_size
    n = 1 + g * g
    d, m, p = cfg.width, cfg.mlp_dim, cfg.patch_size
    patch = 2 * g * g * (p * p * 3) * d
    per_block = 2 * n * d * (3 * d) + 2 * n * d * d + 2 * 2 * n * d * m + 2 * 2 * n * n * d
    return patch + cfg.depth * per_block


def qformer_forward(q_cfg, num_queries: int, text_len: int, image_tokens: int) -> int:
    """Forward FLOPs of one Q-Former pass with `num_queries` query tokens and `text_len` text tokens."""
    d, i = q_cfg.hidden_size, q_cfg.intermediate_size
    s = num_queries + text_len
    total = 0
    for layer in range(q_cfg.num_layers):
        total += 2 * s * d * d * 4 + 2 * 2 * s * s * d              # self-attention: q, k, v, out; scores, mixing
        if num_queries and layer % q_cfg.cross_attention_freq == 0:
            total += 2 * num_queries * d * d * 2                     # cross q, out
            total += 2 * image_tokens * q_cfg.encoder_hidden_size * d * 2   # cross k, v from the image tokens
            total += 2 * 2 * num_queries * image_tokens * d          # cross scores, mixing
        total += 2 * 2 * s * d * i                                   # query FFN on queries, text FFN on text
    return total


def crm_forward(crm_cfg, hidden: int) -> int:
    """Forward FLOPs of the Contextual Reasoning Module (transformer aggregator) on one example."""
    n = crm_cfg.num_probes + 1
    total = 0
    if crm_cfg.aggregator == "transformer":
        per_layer = 2 * n * hidden * 3 * hidden + 2 * n * hidden * hidden + 2 * 2 * n * n * hidden \
            + 2 * 2 * n * hidden * crm_cfg.ffn_dim
        total += crm_cfg.num_layers * per_layer
    elif crm_cfg.aggregator == "mlp":
        total += 2 * crm_cfg.num_probes * hidden * hidden
    return total + 2 * hidden * crm_cfg.head_hidden + 2 * crm_cfg.head_hidden * crm_cfg.num_outputs


def train_step_flops(mc: AdaFocalConfig, batch_size: int, text_len: int, *, frozen_vision: bool = True) -> dict:
    """Model FLOPs of one train step of the global batch, by part; ``total`` is their sum."""
    b2 = mc.blip2
    if not isinstance(b2.vision, ViTConfig):
        raise ValueError(f"analytic FLOPs cover ViT encoders; got {type(b2.vision).__name__}")
    g = mc.image_size // b2.vision.patch_size
    n_img = 1 + g * g
    q, d, e = b2.num_query_tokens, b2.qformer.hidden_size, b2.embed_dim
    vit = 2 * vit_forward(b2.vision, mc.image_size)                        # reference + target
    query = qformer_forward(b2.qformer, q, text_len, n_img) + 2 * d * e     # multimodal pass + text_proj
    target = qformer_forward(b2.qformer, q, 0, n_img) + 2 * q * d * e        # image-only pass + vision_proj
    caam = 0
    if mc.beta_mode == "adaptive":
        caam = qformer_forward(b2.qformer, mc.crm.num_probes, text_len, n_img) + crm_forward(mc.crm, d)
    per_example_trainable = query + target + caam
    loss = 2 * batch_size * batch_size * q * e                              # similarity of every pair
    parts = {
        "vit_forward": batch_size * vit,
        "vit_backward": 0 if frozen_vision else 2 * batch_size * vit,
        "qformer_query_fwd": batch_size * query,
        "qformer_target_fwd": batch_size * target,
        "caam_fwd": batch_size * caam,
        "trainable_backward": 2 * (batch_size * per_example_trainable + loss),
        "loss_fwd": loss,
    }
    parts["total"] = sum(parts.values())
    return parts
