"""InternViT, the vision tower of InternVL, in Flax NNX (transformers 5.23 ``InternVLVisionModel`` semantics).

::

    pixels [B, S, S, 3] --patch conv (with bias) as patchify + matmul--> [B, g*g, D]
      --prepend the CLS token, add the learned positions (bicubically resized, torch's kernel, when the patch
        grid differs from the table's, as transformers' ``interpolate_pos_encoding``)--> [B, 1 + g*g, D]
      --depth x block--> [B, 1 + g*g, D] --final LayerNorm (only without ``use_mean_pooling``)--> last_hidden_state

    block(x):  x = x + lambda_1 * attn(norm1(x));  x = x + lambda_2 * mlp(norm2(x))

* Layer scale: ``lambda_1`` / ``lambda_2`` are learned per-channel [D] vectors.
* ``norm_type``: "layer_norm" (LayerNorm with bias) or "rms_norm" (RMSNorm, weight only) for ``norm1`` / ``norm2``;
  the final norm is always a LayerNorm.
* Attention: bidirectional, q/k/v projections with ``attention_bias`` (False in InternVL2.5/3), an output
  projection with bias; with ``use_qk_norm`` an RMSNorm over the *whole* projected width (all heads together,
  eps 1e-6 whatever ``layer_norm_eps``) is applied to q and k before the heads are split.
* MLP: fc1 -> act -> fc2 (:class:`idmr_jax.models.vit.Mlp`).

:meth:`InternViT.hidden_states` returns transformers' ``hidden_states[k]`` (0 = embeddings, k = output of block k,
negative k counted from ``depth + 1``; no final norm) and :meth:`InternViT.__call__` ``last_hidden_state``.

Flax param paths::

    embeddings/cls_token                     [D]
    embeddings/pos_embed                     [1+g*g, D]       with use_absolute_position_embeddings
    embeddings/patch_embed/{kernel,bias}     [p, p, 3, D], [D]
    encoder/layers/{i}/norm1/scale (+bias)   [D]              bias with layer_norm only
    encoder/layers/{i}/attn/{query,key,value}/kernel  [D, H, Dh] (bias [H, Dh] with attention_bias)
    encoder/layers/{i}/attn/{q_norm,k_norm}/scale     [D]     with use_qk_norm
    encoder/layers/{i}/attn/out/{kernel,bias}         [H, Dh, D], [D]
    encoder/layers/{i}/lambda_1, lambda_2    [D]
    encoder/layers/{i}/norm2/...             as norm1
    encoder/layers/{i}/mlp/fc1, fc2          [D, M], [M, D] (+ biases)
    post_norm/{scale,bias}                   [D]              without use_mean_pooling
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from idmr_jax.models import layers as L
from idmr_jax.models.decoder_lm import RMSNorm
from idmr_jax.models.vit import Mlp, SquareTowerGeometry, remat_policy
from idmr_jax.sharding import constrain

NORM_TYPES = ("layer_norm", "rms_norm")
QK_NORM_EPS = 1e-6  # transformers' InternVLVisionRMSNorm default: the q/k norms are built without layer_norm_eps
_ACT_AXES = ("batch", "length", "embed")
_HEAD_AXES = ("batch", "length", "heads", "kv")


@dataclasses.dataclass(frozen=True)
class InternViTConfig(SquareTowerGeometry):
    """An InternViT (transformers' ``InternVLVisionConfig`` names in brackets).

    width [hidden_size], depth [num_hidden_layers], num_heads [num_attention_heads], mlp_dim [intermediate_size],
    act [hidden_act], qkv_bias [attention_bias], use_qk_norm, norm_type, layer_norm_eps, image_size / patch_size
    (square), use_absolute_position_embeddings, use_mean_pooling (True: no final LayerNorm). dtype / param_dtype /
    precision / remat as :class:`idmr_jax.models.vit.ViTConfig` (the blocks are unrolled: no scan).
    """

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    patch_size: int = 14
    image_size: int = 448
    act: str = "gelu"
    qkv_bias: bool = False
    use_qk_norm: bool = False
    norm_type: str = "layer_norm"
    layer_norm_eps: float = 1e-6
    use_absolute_position_embeddings: bool = True
    use_mean_pooling: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    precision: str | None = None
    remat: str = "none"

    def __post_init__(self):
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}")
        self.check_tower_fields()


def _dtypes(cfg: InternViTConfig) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _dense(cfg: InternViTConfig, rngs, in_f, out_f, in_axes, out_axes, *, use_bias=True) -> L.Dense:
    return L.Dense(in_f, out_f, in_axes=in_axes, out_axes=out_axes, use_bias=use_bias, precision=cfg.precision,
                   rngs=rngs, **_dtypes(cfg))


def _block_norm(cfg: InternViTConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.width, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))
    return L.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))


class Embeddings(nnx.Module):
    """CLS token + patch projection (a stride-p conv with bias) + optional learned absolute positions."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, p, d = jnp.dtype(cfg.param_dtype), cfg.patch_size, cfg.width
        self.cls_token = L.make_param(rngs, L.trunc_normal(0.02), (d,), ("embed",), pdt)
        n = 1 + cfg.grid[0] * cfg.grid[1]
        self.pos_embed = (L.make_param(rngs, L.trunc_normal(0.02), (n, d), (None, "embed"), pdt)
                          if cfg.use_absolute_position_embeddings else None)
        self.patch_embed = _dense(cfg, rngs, (p, p, 3), d, ("patch", "patch", "channels"), ("embed",))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        p = self.cfg.patch_size
        if c != 3 or h % p or w % p:
            raise ValueError(f"expected NHWC pixels with 3 channels and sides divisible by {p}, got {pixels.shape}")
        gh, gw = h // p, w // p
        # The strided conv as patchify + one contraction over (p, p, C).
        x = pixels.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x).reshape(b, gh * gw, self.cfg.width)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, self.cfg.width))
        x = jnp.concatenate([cls, x], axis=1)
        if self.pos_embed is not None:
            pos = self.pos_embed[...]
            pos = jnp.concatenate([pos[:1], L.resize_grid_embedding(pos[1:], self.cfg.grid, (gh, gw))], axis=0)
            x = x + pos.astype(x.dtype)[None]
        return constrain(x, _ACT_AXES)


class Attention(nnx.Module):
    """Bidirectional multi-head self-attention with InternViT's optional whole-width q/k RMSNorm."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hd = cfg.width, cfg.num_heads, cfg.head_dim
        self.query = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"), use_bias=cfg.qkv_bias)
        self.key = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"), use_bias=cfg.qkv_bias)
        self.value = _dense(cfg, rngs, d, (h, hd), ("embed",), ("heads", "kv"), use_bias=cfg.qkv_bias)
        self.out = _dense(cfg, rngs, (h, hd), d, ("heads", "kv"), ("embed",))
        self.q_norm = RMSNorm(d, eps=QK_NORM_EPS, rngs=rngs, **_dtypes(cfg)) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(d, eps=QK_NORM_EPS, rngs=rngs, **_dtypes(cfg)) if cfg.use_qk_norm else None

    def _whole_width_norm(self, norm: RMSNorm | None, x: jax.Array) -> jax.Array:
        # transformers normalises the flat [.., H * Dh] projection, all heads together.
        if norm is None:
            return x
        return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = L.fused_dense((self.query, self.key, self.value), x)
        q, k = self._whole_width_norm(self.q_norm, q), self._whole_width_norm(self.k_norm, k)
        q, k, v = (constrain(t, _HEAD_AXES) for t in (q, k, v))
        o = L.dot_product_attention(q, k, v, precision=self.cfg.precision)
        return self.out(constrain(o, _HEAD_AXES))


class Block(nnx.Module):
    """Pre-norm block with layer scale: x + lambda_1 * attn(norm1(x)), then x + lambda_2 * mlp(norm2(x))."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.norm1 = _block_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = _block_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        self.lambda_1 = L.make_param(rngs, jax.nn.initializers.constant(0.1), (cfg.width,), ("embed",), pdt)
        self.lambda_2 = L.make_param(rngs, jax.nn.initializers.constant(0.1), (cfg.width,), ("embed",), pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.lambda_1[...].astype(x.dtype) * self.attn(self.norm1(x))
        x = x + self.lambda_2[...].astype(x.dtype) * self.mlp(self.norm2(x))
        return constrain(x, _ACT_AXES)


def _apply_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


class Encoder(nnx.Module):
    """``depth`` blocks (``layers/{i}/...``)."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])

    def __call__(self, x: jax.Array, *, start: int = 0, stop: int | None = None) -> jax.Array:
        """Runs blocks ``start .. stop - 1`` (all by default)."""
        stop = self.cfg.depth if stop is None else stop
        remat = self.cfg.remat
        apply = _apply_block if remat == "none" else nnx.remat(_apply_block, policy=remat_policy(remat))
        for i in range(start, stop):
            x = apply(self.layers[i], x)
        return x


class InternViT(nnx.Module):
    """InternVL's vision tower; see the module docstring."""

    def __init__(self, cfg: InternViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_norm = (L.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, rngs=rngs, **_dtypes(cfg))
                          if not cfg.use_mean_pooling else None)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """transformers' ``last_hidden_state`` [B, 1 + g*g, D] of NHWC pixels (already normalised)."""
        x = self.encoder(self.embeddings(pixels.astype(jnp.dtype(self.cfg.dtype))))
        return x if self.post_norm is None else self.post_norm(x)

    def hidden_states(self, pixels: jax.Array, layer: int) -> jax.Array:
        """transformers' ``hidden_states[layer]``: 0 the embeddings, k the output of block k (no final norm),
        negative `layer` counted from ``depth + 1``. Only the blocks up to `layer` run."""
        n = self.cfg.depth + 1
        if not -n <= layer < n:
            raise ValueError(f"hidden state index {layer} is out of range for a {self.cfg.depth}-block InternViT")
        x = self.embeddings(pixels.astype(jnp.dtype(self.cfg.dtype)))
        return self.encoder(x, stop=layer % n)

    def features(self, pixels: jax.Array, layer: int) -> jax.Array:
        """What InternVL's ``get_image_features`` takes from the tower for ``vision_feature_layer`` `layer`:
        ``last_hidden_state`` for -1 (after the final norm, if any), else ``hidden_states[layer]``."""
        return self(pixels) if layer == -1 else self.hidden_states(pixels, layer)
