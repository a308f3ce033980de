"""Vision Transformers: BLIP-2's EVA ViT-g/14 and CLIP ViTs, as one Flax NNX module family.

Two styles share one module:

* ``style="eva"`` follows transformers' ``Blip2VisionModel`` (== LAVIS ``eva_vit.VisionTransformer`` as used by
  BLIP-2): class token, patch conv with bias, learned absolute positions, pre-LN blocks with one fused qkv
  projection, exact-erf GELU MLP. The qkv bias is held fused, ``[3, H, Dh]``, exactly like HF's ``qkv.bias``
  parameter; LAVIS's ``q_bias`` / ``v_bias`` pair is that bias with a zero k third (a k bias cannot change the
  output: it adds the same constant to every logit of a query row). There is no final norm: BLIP-2's trainable
  ``ln_vision`` (HF ``post_layernorm``) lives in the BLIP-2 assembly, so ``tokens`` equals
  ``Blip2VisionModel(...).hidden_states[-1]``.
* ``style="clip"`` follows ``CLIPVisionModel``: class token, bias-free patch conv, positions, ``pre_layrnorm``,
  pre-LN blocks with separate q/k/v/out projections (all with bias), quick-GELU MLP; ``pooled`` is
  ``post_layernorm(tokens[:, 0])``. ``tokens`` equals ``last_hidden_state`` and ``pooled`` ``pooler_output``.

Flax param paths (unscanned; with ``scan=True`` every ``encoder/layers/{i}/X`` becomes ``encoder/layers/X`` with a
leading ``layers`` axis, which ``idmr_jax.weights.mapping.stack_for_model`` understands)::

    embeddings/cls_token                    [D]                 (embed)
    embeddings/pos_embed                    [1+g*g, D]          (None, embed)
    embeddings/patch_embed/kernel           [p, p, 3, D]        (patch, patch, channels, embed)
    embeddings/patch_embed/bias             [D]                 eva only
    pre_norm/{scale,bias}                   [D]                 clip only
    encoder/layers/{i}/norm1/{scale,bias}   [D]
    encoder/layers/{i}/attn/qkv/kernel      [D, 3, H, Dh]       eva  (embed, None, heads, kv)
    encoder/layers/{i}/attn/qkv/bias        [3, H, Dh]          eva, qkv_bias=True
    encoder/layers/{i}/attn/{query,key,value}/kernel [D, H, Dh] clip (embed, heads, kv); bias [H, Dh]
    encoder/layers/{i}/attn/out/kernel      [H, Dh, D]          (heads, kv, embed); bias [D]
    encoder/layers/{i}/norm2/{scale,bias}   [D]
    encoder/layers/{i}/mlp/fc1/kernel       [D, M]              (embed, mlp); bias [M]
    encoder/layers/{i}/mlp/fc2/kernel       [M, D]              (mlp, embed); bias [D]
    post_norm/{scale,bias}                  [D]                 clip only

Attention kernels keep the head axis separate so tensor parallelism shards whole heads (a flat ``[D, 3D]``
kernel sharded on its output axis would cut across the q/k/v boundaries).

Inputs are NHWC pixels; any ``H, W`` works (trailing pixels that do not fill a patch are dropped, as by the
strided conv). When the patch grid differs from the pretraining grid the position table is resized bicubically
with torch's kernel, i.e. transformers' ``interpolate_pos_encoding=True``.

Intermediate layers (LLaVA takes the second-to-last): :meth:`VisionTransformer.hidden_states` returns
transformers' ``hidden_states[k]`` (0 = the embeddings after ``pre_layrnorm``, k = the output of block k,
negative k counted from ``depth + 1``) and runs only the blocks it needs; the param tree stays the full
checkpoint's, so conversions stay exact in both directions. The blocks also take an additive attention ``bias``
(the CLIP text tower reuses them with a causal + padding mask).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.sharding import constrain

STYLES = ("eva", "clip")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class SquareTowerGeometry:
    """What the square-image ViT configs (:class:`ViTConfig`, ``internvit.InternViTConfig``) derive from their
    ``width`` / ``num_heads`` / ``image_size`` / ``patch_size`` fields, and the checks of the fields they share
    (``remat``, ``act``)."""

    def check_tower_fields(self) -> None:
        """Raises ``ValueError`` for an unknown remat policy or activation, or a width the heads do not divide."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        L.activation(self.act)  # validates the name

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of the pretraining resolution (the layout of the position table)."""
        g = self.image_size // self.patch_size
        return (g, g)


@dataclasses.dataclass(frozen=True)
class ViTConfig(SquareTowerGeometry):
    """Architecture and execution options of a :class:`VisionTransformer`.

    `remat`: "none" | "full" (recompute everything in the backward pass) | "dots" (save matmul outputs) |
    "dots_no_batch" (save only matmuls without batch dims, i.e. weight-stationary ones). `scan`: stack the
    blocks and run them with ``nnx.scan`` (one compiled block; params get a leading "layers" axis).
    `precision`: matmul precision ("default" | "high" | "highest" | None); "highest" makes float32 runs on TPU
    use full-precision passes.
    """

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    style: str = "clip"
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"
    qkv_bias: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan: bool = False
    precision: str | None = None

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        self.check_tower_fields()
        if self.style == "clip" and not self.qkv_bias:
            raise ValueError("CLIP-style attention always has q/k/v biases (qkv_bias=False is EVA-only)")

    @property
    def num_positions(self) -> int:
        return 1 + self.grid[0] * self.grid[1]


_VARIANTS: dict[str, dict[str, Any]] = {
    # BLIP-2 / LAVIS EVA ViT-g/14: 40 EVA blocks, the last dropped -> 39; mlp = int(1408 * 4.3637) = 6144.
    "eva-g/14": dict(style="eva", width=1408, depth=39, num_heads=16, mlp_dim=6144, patch_size=14, image_size=224,
                     layer_norm_eps=1e-6, act="gelu"),
    "L/14": dict(style="clip", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14, image_size=224,
                 layer_norm_eps=1e-5, act="quick_gelu"),
    "L/14-336": dict(style="clip", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14, image_size=336,
                     layer_norm_eps=1e-5, act="quick_gelu"),
    "B/16": dict(style="clip", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, image_size=224,
                 layer_norm_eps=1e-5, act="quick_gelu"),
    "B/32": dict(style="clip", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=32, image_size=224,
                 layer_norm_eps=1e-5, act="quick_gelu"),
    # Tiny test variants: 4x4 patch grid (17 tokens).
    "eva-tiny": dict(style="eva", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=14, image_size=56,
                     layer_norm_eps=1e-6, act="gelu"),
    "clip-tiny": dict(style="clip", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=14, image_size=56,
                      layer_norm_eps=1e-5, act="quick_gelu"),
}


def vit_config(variant: str, **overrides) -> ViTConfig:
    """A :class:`ViTConfig` from the variant table ("eva-g/14", "L/14", "L/14-336", "B/16", "B/32",
    "eva-tiny", "clip-tiny"), with any field overridden (e.g. ``dtype="bfloat16", scan=True``)."""
    if variant not in _VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; known: {sorted(_VARIANTS)}")
    return ViTConfig(**{**_VARIANTS[variant], **overrides})


@flax.struct.dataclass
class VisionOutput:
    """ViT outputs. `tokens`: [B, 1 + gh*gw, width], CLS first then patches row-major (token index of patch
    (r, c) is ``1 + r*gw + c``); `grid`: (gh, gw) (static); `pooled`: [B, width] for CLIP, else None."""

    tokens: jax.Array
    grid: tuple[int, int] = flax.struct.field(pytree_node=False)
    pooled: jax.Array | None = None


_ACT_AXES = ("batch", "length", "embed")


def _dense(cfg: ViTConfig, rngs: nnx.Rngs, in_f, out_f, in_axes, out_axes, *, use_bias=True) -> L.Dense:
    return L.Dense(in_f, out_f, in_axes=in_axes, out_axes=out_axes, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs)


def _norm(cfg: ViTConfig, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class PatchEmbedding(nnx.Module):
    """CLS token + non-overlapping patch projection (a stride-p conv, written as a patchify + matmul) + positions."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        p, d = cfg.patch_size, cfg.width
        self.cls_token = L.make_param(rngs, L.trunc_normal(0.02), (d,), ("embed",), pdt)
        self.pos_embed = L.make_param(rngs, L.trunc_normal(0.02), (cfg.num_positions, d), (None, "embed"), pdt)
        # HF Blip2 / LAVIS EVA patch convs have a bias; CLIP's does not.
        self.patch_embed = _dense(cfg, rngs, (p, p, 3), d, ("patch", "patch", "channels"), ("embed",),
                                  use_bias=cfg.style == "eva")

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
        cfg = self.cfg
        b, h, w, c = pixels.shape
        if c != 3:
            raise ValueError(f"expected NHWC pixels with 3 channels, got shape {pixels.shape}")
        p = cfg.patch_size
        gh, gw = h // p, w // p
        if gh == 0 or gw == 0:
            raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
        # VALID strided conv == patchify then contract (p, p, C): crop the remainder like the conv does.
        x = pixels[:, : gh * p, : gw * p, :].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x).reshape(b, gh * gw, cfg.width)
        dtype = x.dtype
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, cfg.width))
        pos = self.pos_embed[...]
        pos = jnp.concatenate([pos[:1], L.resize_grid_embedding(pos[1:], cfg.grid, (gh, gw))], axis=0)
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(dtype)[None]
        return constrain(x, _ACT_AXES), (gh, gw)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention; fused qkv (EVA) or separate q/k/v projections (CLIP)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        if cfg.style == "eva":
            # One [D, 3, H, Dh] kernel: LAVIS/HF store qkv as one Linear whose output is laid out (3, H, Dh).
            # The bias is the full [3, H, Dh] of HF's `qkv.bias`; its k third is zero in every released
            # checkpoint and cannot change the output anyway (it adds a per-query constant to all logits).
            self.qkv = _dense(cfg, rngs, d, (3, h, hd), ("embed",), (None, "heads", "kv"), use_bias=cfg.qkv_bias)
        else:
            self.query = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"))
            self.key = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"))
            self.value = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"))
        self.out = _dense(cfg, rngs, (h, hd), d, ("heads", "kv"), ("embed",))

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """`bias`: additive attention logits bias broadcastable to [B, H, L, L] (None: bidirectional, unmasked)."""
        if self.cfg.style == "eva":
            qkv = self.qkv(x)  # [B, L, 3, H, Dh]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:  # one matmul for the three projections; the params stay separate (see layers.fused_dense)
            q, k, v = L.fused_dense((self.query, self.key, self.value), x)
        head_axes = ("batch", "length", "heads", "kv")
        q, k, v = (constrain(t, head_axes) for t in (q, k, v))
        o = L.dot_product_attention(q, k, v, bias=bias, precision=self.cfg.precision)
        return self.out(constrain(o, head_axes))


class Mlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.act = cfg.act
        self.fc1 = _dense(cfg, rngs, cfg.width, cfg.mlp_dim, ("embed",), ("mlp",))
        self.fc2 = _dense(cfg, rngs, cfg.mlp_dim, cfg.width, ("mlp",), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = L.activation(self.act)(self.fc1(x))
        return self.fc2(constrain(x, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, rngs)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.norm2 = _norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        x = x + self.attn(self.norm1(x), bias)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, _ACT_AXES)


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of a `remat` name other than "none" (see :class:`ViTConfig`)."""
    return {
        "full": None,  # save nothing: recompute the whole block in the backward pass
        "dots": jax.checkpoint_policies.dots_saveable,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


def _apply_block(block: Block, x: jax.Array, bias: jax.Array | None) -> jax.Array:
    return block(x, bias)


class Encoder(nnx.Module):
    """`depth` blocks, as a list (``layers/{i}/...``) or, with ``cfg.scan``, one stacked block run by nnx.scan."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.scan:
            # A scan over split rngs creates `depth` independent blocks as one module with stacked params (the
            # values vmap would give, to rounding); transform_metadata prepends the "layers" logical axis to every
            # param's sharding names. A scan, not a vmap: the random init's temporaries then exist for one block
            # at a time (EVA ViT-g on 8 CPU devices: 0.3 instead of 2.5 GB per device).
            @nnx.split_rngs(splits=cfg.depth)
            @nnx.scan(in_axes=(0,), out_axes=0, length=cfg.depth,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r: nnx.Rngs) -> Block:
                return Block(cfg, rngs=r)

            self.layers = make(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])

    def __call__(self, x: jax.Array, *, bias: jax.Array | None = None, start: int = 0,
                 stop: int | None = None) -> jax.Array:
        """Runs blocks ``start .. stop - 1`` (all by default) on `x`; `bias` is added to every attention's logits."""
        cfg = self.cfg
        stop = cfg.depth if stop is None else stop
        if not 0 <= start <= stop <= cfg.depth:
            raise ValueError(f"block range [{start}, {stop}) is outside the encoder's {cfg.depth} blocks")
        if start == stop:
            return x
        apply = _apply_block
        if cfg.remat != "none":
            apply = nnx.remat(_apply_block, policy=remat_policy(cfg.remat))
        if cfg.scan:
            layers = self.layers
            if (start, stop) != (0, cfg.depth):
                # A view of the stacked params restricted to the wanted blocks (slicing is differentiable, so
                # gradients reach the full stacked params; the blocks hold no mutable state to write back).
                graphdef, state = nnx.split(self.layers)
                layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))

            def body(h, block):
                return apply(block, h, bias), None

            x, _ = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                            transform_metadata={nnx.PARTITION_NAME: "layers"})(x, layers)
            return x
        for i in range(start, stop):
            x = apply(self.layers[i], x, bias)
        return x


class VisionTransformer(nnx.Module):
    """EVA (BLIP-2) or CLIP Vision Transformer; see the module docstring for semantics and param layout."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = PatchEmbedding(cfg, rngs=rngs)
        self.pre_norm = _norm(cfg, rngs) if cfg.style == "clip" else None
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_norm = _norm(cfg, rngs) if cfg.style == "clip" else None

    def __call__(self, pixels: jax.Array, *, deterministic: bool = True) -> VisionOutput:
        """Encodes NHWC float pixels [B, H, W, 3] (already normalised) into a :class:`VisionOutput`.

        `deterministic` is accepted for API uniformity; the port has no dropout or drop-path (both backbones
        are used frozen / at rate 0), so it has no effect.
        """
        del deterministic
        x, grid = self.embeddings(pixels.astype(jnp.dtype(self.cfg.dtype)))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.encoder(x)
        pooled = self.post_norm(x[:, 0]) if self.post_norm is not None else None
        return VisionOutput(tokens=x, grid=grid, pooled=pooled)

    def hidden_states(self, pixels: jax.Array, layers: int | Sequence[int]) -> tuple[jax.Array, ...]:
        """transformers' ``hidden_states[k]`` for each k in `layers` (an int or a sequence), in that order.

        Index 0 is the embeddings (after ``pre_layrnorm`` for CLIP), k >= 1 the output of block k, negative k
        counts from ``depth + 1`` (so -1 is the last block's output, before any ``post_layernorm``; -2 is LLaVA's
        default). Only the blocks up to the deepest requested index run.
        """
        wanted = [layers] if isinstance(layers, int) else list(layers)
        n = self.cfg.depth + 1
        resolved = []
        for k in wanted:
            if not -n <= k < n:
                raise ValueError(f"hidden state index {k} is out of range for a {self.cfg.depth}-block ViT")
            resolved.append(k % n)
        x, _ = self.embeddings(pixels.astype(jnp.dtype(self.cfg.dtype)))
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        states, done = {0: x}, 0
        for k in sorted(set(resolved)):
            if k > done:
                x = self.encoder(x, start=done, stop=k)
                states[k], done = x, k
        return tuple(states[k] for k in resolved)


def patch_grid(cfg: ViTConfig, height: int, width: int) -> tuple[int, int]:
    """The (gh, gw) token grid the model produces for an image of `height` x `width` pixels."""
    return (height // cfg.patch_size, width // cfg.patch_size)
