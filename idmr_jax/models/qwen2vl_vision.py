"""The Qwen2-VL vision tower (transformers 5.23 ``Qwen2VisionTransformerPretrainedModel``) in Flax NNX.

::

    patches [B, N, C*T*P*P] (qwen2vl_inputs.patchify: block-major order, each patch [C, T, P, P])
      --patch_embed: the Conv3d with kernel = stride = [T, P, P] is one matmul over a flattened patch (no bias)-->
      [B, N, D]
      --depth x block: x + attn(norm1(x)), x + mlp(norm2(x))  (LayerNorm eps 1e-6; fused qkv with bias; 2D RoPE on
        q and k in float32; attention only between patches of the same segment = image; mlp fc1 -> act -> fc2)-->
      [B, N, D]  = :class:`Qwen2VLVisionTower` (the embedder's ``vision_features``)
      --PatchMerger: ln_q, then every merge^2 consecutive patches (one 2x2 block) concatenated -> fc1 -> GELU
        -> fc2-->
      [B, N / merge^2, out_dim]  (LM tokens; the reference's ``pooler_output``)

The reference keeps the merger inside its vision model (``visual.merger``); the embedder holds it next to the
tower as its ``projector`` (it plays LLaVA's projector's part: the trainer's ``freeze_vision`` /
``train_projector`` options then mean the same for both backbones).

2D RoPE (:func:`idmr_jax.models.rotary.axial_cos_sin`): each patch's (row, column) in its image's patch grid
(``qwen2vl_inputs.grid_positions``); head_dim / 4 frequencies over head_dim / 2 rotate by the row, the next
head_dim / 4 by the column. Several images of different sizes are packed into one row (``B = 1``, the reference's
concatenated ``pixel_values``) with ``segment_ids`` so attention stays within each image (its ``cu_seqlens``);
same-size images can instead be a batch ``[B, N, ...]`` without segments (the trainer's fixed grid).

Flax param paths of the tower and the merger (torch names of ``visual.*`` in brackets)::

    patch_embed/proj/kernel          [C*T*P*P, D]     [patch_embed.proj.weight  [D, C, T, P, P]]
    blocks/{i}/norm{1,2}/{scale,bias} [D]
    blocks/{i}/attn/qkv/kernel       [D, 3, H, Dh]    [blocks.{i}.attn.qkv.weight [3D, D]]; bias [3, H, Dh]
    blocks/{i}/attn/proj/kernel      [H, Dh, D]       [blocks.{i}.attn.proj.weight]; bias [D]
    blocks/{i}/mlp/fc{1,2}/{kernel,bias}
    (merger) ln_q/{scale,bias}       [D]              [merger.ln_q]
    (merger) fc1/{kernel,bias}       [4D, 4D]         [merger.mlp.0]
    (merger) fc2/{kernel,bias}       [4D, out_dim]    [merger.mlp.2]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models.rotary import apply_rope, axial_cos_sin


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The vision tower (transformers ``Qwen2VLVisionConfig`` names; ``hidden_size`` is the merger's output width,
    the LM's hidden size). dtype / param_dtype / precision: execution options as the other towers'."""

    depth: int = 32
    embed_dim: int = 1280
    hidden_size: int = 3584
    mlp_ratio: float = 4.0
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str | None = None

    def __post_init__(self):
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a multiple of 4 "
                             "(2D rotary embeddings)")
        L.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Width of one flattened patch, ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def merged_dim(self) -> int:
        """Width of one merged 2x2 block, ``D * merge^2``."""
        return self.embed_dim * self.spatial_merge_size ** 2

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) patches of an image; both sides must be multiples of ``patch_size * spatial_merge_size``."""
        unit = self.patch_size * self.spatial_merge_size
        if height % unit or width % unit:
            raise ValueError(f"image size {height}x{width} is not a multiple of {unit}")
        return height // self.patch_size, width // self.patch_size


def _dense(cfg: Qwen2VLVisionConfig, rngs: nnx.Rngs, in_f, out_f, in_axes, out_axes, *, use_bias=True) -> L.Dense:
    return L.Dense(in_f, out_f, in_axes=in_axes, out_axes=out_axes, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision, rngs=rngs)


def _norm(cfg: Qwen2VLVisionConfig, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axes=("vision_embed",), dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding as one bias-free matmul over flattened ``[C, T, P, P]`` patches."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.proj = _dense(cfg, rngs, cfg.patch_dim, cfg.embed_dim, ("patch",), ("vision_embed",), use_bias=False)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


class VisionAttention(nnx.Module):
    """Bidirectional attention with the fused qkv projection and 2D RoPE, restricted to equal segment ids."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.qkv = _dense(cfg, rngs, d, (3, h, hd), ("vision_embed",), (None, "heads", "kv"))
        self.proj = _dense(cfg, rngs, (h, hd), d, ("heads", "kv"), ("vision_embed",))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None) -> jax.Array:
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # The reference rotates q and k in float32 whatever the compute dtype.
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(v.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(v.dtype)
        o = L.dot_product_attention(q, k, v, mask=mask, precision=self.cfg.precision)
        return self.proj(o)


class VisionMlp(nnx.Module):
    """fc1 -> act -> fc2."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.fc1 = _dense(cfg, rngs, cfg.embed_dim, cfg.mlp_dim, ("vision_embed",), ("mlp",))
        self.fc2 = _dense(cfg, rngs, cfg.mlp_dim, cfg.embed_dim, ("mlp",), ("vision_embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(L.activation(self.act)(self.fc1(x)))


class VisionBlock(nnx.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, rngs)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = _norm(cfg, rngs)
        self.mlp = VisionMlp(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """ln_q, then each ``merge^2`` consecutive patches concatenated -> fc1 -> GELU (erf) -> fc2 (LM width)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.group = cfg.spatial_merge_size ** 2
        self.ln_q = _norm(cfg, rngs)
        self.fc1 = _dense(cfg, rngs, cfg.merged_dim, cfg.merged_dim, ("vision_embed",), ("mlp",))
        self.fc2 = _dense(cfg, rngs, cfg.merged_dim, cfg.hidden_size, ("mlp",), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., N, D]`` -> ``[..., N / merge^2, out_dim]``."""
        x = self.ln_q(x)
        x = x.reshape(x.shape[:-2] + (x.shape[-2] // self.group, x.shape[-1] * self.group))
        return self.fc2(L.activation("gelu")(self.fc1(x)))


class Qwen2VLVisionTower(nnx.Module):
    """Patch embedding and blocks with 2D RoPE (the merger is :class:`PatchMerger`); see the module docstring."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])

    def __call__(self, patches: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None
                 ) -> jax.Array:
        """The last block's output ``[B, N, D]`` (before the merger; the reference's ``last_hidden_state``).

        `patches` ``[B, N, C*T*P*P]``; `positions` ``[B or 1, N, 2]`` (row, column) for the 2D RoPE;
        `segment_ids` ``[B, N]``: patches attend only to patches of the same id (None: to the whole row).
        """
        cfg = self.cfg
        x = self.patch_embed(patches.astype(jnp.dtype(cfg.dtype)))
        cos, sin = axial_cos_sin(positions, cfg.head_dim, cfg.rope_theta, jnp.float32)
        cos = jnp.broadcast_to(cos, x.shape[:2] + cos.shape[-1:])
        sin = jnp.broadcast_to(sin, x.shape[:2] + sin.shape[-1:])
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return x
