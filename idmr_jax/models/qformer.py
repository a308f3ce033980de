"""BLIP-2 Querying Transformer (Q-Former) in Flax NNX, with its BERT text embeddings.

Semantics follow transformers' ``Blip2QFormerModel`` plus ``Blip2TextEmbeddings`` (LAVIS ``Qformer.bert``):

* A BERT-base style post-LayerNorm encoder. Layers ``i`` with ``i % cross_attention_freq == 0`` (0, 2, 4, ...)
  also carry a cross-attention block whose keys/values come from the image tokens (``encoder_hidden_size`` wide).
* The sequence is ``[query tokens; text tokens]``. Queries and text share one *bidirectional* self-attention
  (the text padding mask masks keys only). Only the query positions cross-attend to the image, and they use their
  own feed-forward block (``ffn_query``, LAVIS/HF ``intermediate_query``/``output_query``); text positions use
  the ordinary BERT feed-forward block (``ffn``).
* One LayerNorm (``layernorm``; HF ``qformer.layernorm``, LAVIS ``Qformer.bert.embeddings.LayerNorm``) is applied
  to the concatenation of the query embeddings and the text embeddings (word + absolute position, positions
  counted from 0 at the first *text* token, as in both reference implementations).
* Three modes: image-only (queries, no text), image+text (queries then text; the text [CLS] sits at index
  ``num_queries``), text-only (no queries, no image; a plain BERT encoder).

For AdaFocal every cross-attention layer accepts an additive ``attention_bias`` (broadcastable to
``[batch, heads, queries, image_tokens]``) that is added to the logits after the ``1/sqrt(d)`` scaling, before
the softmax. Self-attention never sees it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from idmr_jax.models import layers as L
from idmr_jax.sharding import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Q-Former hyper-parameters. Defaults are BLIP-2's (BERT-base, cross-attention every 2nd layer, EVA-g input).

    Names follow ``transformers.Blip2QFormerConfig`` where they can (``num_layers`` =
    ``num_hidden_layers``, ``num_heads`` = ``num_attention_heads``, ``cross_attention_freq`` =
    ``cross_attention_frequency``, ``hidden_dropout`` = ``hidden_dropout_prob``, ``attention_dropout`` =
    ``attention_probs_dropout_prob``).
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    encoder_hidden_size: int = 1408
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"  # BERT's exact (erf) GELU (names as in idmr_jax.models.layers.ACTIVATIONS)
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass
    # Run the layers as a jax.lax.scan over units of cross_attention_freq layers (one cross-attention layer and
    # the plain ones after it), so that XLA compiles one unit instead of every layer. The params keep their
    # per-layer layout (they are stacked for the scan), so checkpoints and converters are unchanged.
    scan_layers: bool = False
    precision: str | None = None  # matmul precision: "default" | "high" | "highest" | None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.cross_attention_freq < 1:
            raise ValueError("cross_attention_freq must be >= 1")
        L.activation(self.hidden_act)  # validates the name

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers that cross-attend to the image (0, freq, 2*freq, ...)."""
        return tuple(i for i in range(self.num_layers) if i % self.cross_attention_freq == 0)


@struct.dataclass
class QFormerOutput:
    """Result of a Q-Former pass (a pytree, so it can leave ``nnx.jit``).

    last_hidden_state: [B, Q + T, D] -- query outputs first, then text outputs.
    query_length: Q, the number of query positions at the front (static).
    cross_attentions: per cross-attention layer (in layer order) the probabilities [B, H, Q, N], or None.
    self_attentions: per layer the self-attention probabilities [B, H, Q+T, Q+T], or None.
    """

    last_hidden_state: Array
    query_length: int = struct.field(pytree_node=False, default=0)
    cross_attentions: tuple[Array, ...] | None = None
    self_attentions: tuple[Array, ...] | None = None


# ----------------------------------------------------------------------------------------------
# Building blocks.


def _dense(cfg: QFormerConfig, in_features, out_features, in_axes, out_axes, *, rngs: nnx.Rngs) -> L.Dense:
    """BERT-initialised linear layer (N(0, initializer_range) kernel, zero bias) with logical axis names."""
    return L.Dense(in_features, out_features, in_axes=in_axes, out_axes=out_axes,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), precision=cfg.precision,
                   kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)


def _layer_norm(cfg: QFormerConfig, *, rngs: nnx.Rngs) -> L.LayerNorm:
    return L.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                       param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)


class Attention(nnx.Module):
    """BERT attention block: multi-head attention, output projection, dropout, residual, post-LayerNorm.

    Used for self-attention (keys/values from the sequence itself) and for cross-attention (keys/values from
    the image tokens, projected from ``kv_features``). Params: ``query``, ``key``, ``value`` (kernels
    [in, heads, head_dim]), ``out`` (kernel [heads, head_dim, D]) and ``norm`` -- HF/LAVIS
    ``attention.{attention,self}.{query,key,value}``, ``attention.output.dense``, ``attention.output.LayerNorm``.
    The head axis is kept separate so that tensor parallelism shards whole heads.
    """

    def __init__(self, cfg: QFormerConfig, *, kv_features: int, kv_axis: str, rngs: nnx.Rngs):
        self.cfg = cfg
        d, heads = cfg.hidden_size, (cfg.num_heads, cfg.head_dim)
        self.query = _dense(cfg, d, heads, ("embed",), ("heads", "kv"), rngs=rngs)
        self.key = _dense(cfg, kv_features, heads, (kv_axis,), ("heads", "kv"), rngs=rngs)
        self.value = _dense(cfg, kv_features, heads, (kv_axis,), ("heads", "kv"), rngs=rngs)
        self.out = _dense(cfg, heads, d, ("heads", "kv"), ("embed",), rngs=rngs)
        self.norm = _layer_norm(cfg, rngs=rngs)
        self.attn_dropout = nnx.Dropout(cfg.attention_dropout, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: Array, kv: Array | None, key_mask: Array | None, bias: Array | None, *,
                 deterministic: bool, return_probs: bool = False) -> tuple[Array, Array | None]:
        """x: [B, L, D] queries (and residual); kv: [B, S, Dkv], or None for self-attention (keys/values from x);
        key_mask: bool, broadcastable to [B, 1, 1, S]; bias: additive logits bias broadcastable to [B, H, L, S].
        Returns (output [B, L, D], probs [B, H, L, S] with `return_probs`, else None)."""
        heads_axes = ("batch", "length", "heads", "kv")
        # One matmul for q, k, v (self-attention) or for k, v (cross-attention): the kernels are stacked at
        # compute time, the parameters stay separate (converters and checkpoints are unchanged).
        if kv is None:
            q, k, v = L.fused_dense((self.query, self.key, self.value), x)
        else:
            q = self.query(x)
            k, v = L.fused_dense((self.key, self.value), kv)
        q, k, v = (constrain(t, heads_axes) for t in (q, k, v))

        # Logits and softmax in float32 whatever the compute dtype (layers.dot_product_attention): the bias
        # (AdaFocal's beta * M_B) can be large, and bf16 logits lose the small differences between image tokens.
        # The 1/sqrt(d) scaling is applied to q (exact for BERT's head_dim 64): a product left next to the
        # softmax's subtraction gets contracted into an FMA by XLA only when no bias sits in between, so a zero
        # bias would not reproduce the unbiased output bit for bit. The key mask is applied with `where` after the
        # bias (same as HF's (1 - mask) * finfo.min for every visible key), so no bias can re-open a padded key.
        q = q * jnp.asarray(1.0 / math.sqrt(self.cfg.head_dim), q.dtype)
        # Attention dropout (training) needs the explicit softmax; without it jax.nn.dot_product_attention runs.
        dropout = None
        if not deterministic and self.cfg.attention_dropout > 0:
            dropout = functools.partial(self.attn_dropout, deterministic=False)
        attn = L.dot_product_attention(q, k, v, bias=bias, mask=key_mask, scale=1.0, precision=self.cfg.precision,
                                       probs_dropout=dropout, return_probs=return_probs)
        ctx, probs = attn if return_probs else (attn, None)
        h = self.dropout(self.out(constrain(ctx, heads_axes)), deterministic=deterministic)
        out = self.norm(h + x)
        return constrain(out, ("batch", "length", "embed")), probs


class FeedForward(nnx.Module):
    """BERT feed-forward block: dense -> act -> dense -> dropout -> residual -> LayerNorm.

    Params ``intermediate``, ``output``, ``norm`` (HF/LAVIS ``intermediate.dense``, ``output.dense``,
    ``output.LayerNorm``; or their ``_query`` twins).
    """

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.act = L.activation(cfg.hidden_act)
        self.intermediate = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed",), ("mlp",), rngs=rngs)
        self.output = _dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp",), ("embed",), rngs=rngs)
        self.norm = _layer_norm(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)

    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        h = constrain(self.act(self.intermediate(x)), ("batch", "length", "mlp"))
        h = self.dropout(self.output(h), deterministic=deterministic)
        return constrain(self.norm(h + x), ("batch", "length", "embed"))


class QFormerLayer(nnx.Module):
    """One Q-Former layer: shared self-attention, cross-attention for the query positions (on cross layers),
    then the query FFN on query positions and the text FFN on text positions."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int, *, rngs: nnx.Rngs):
        self.has_cross_attention = layer_idx % cfg.cross_attention_freq == 0
        self.attention = Attention(cfg, kv_features=cfg.hidden_size, kv_axis="embed", rngs=rngs)
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, kv_features=cfg.encoder_hidden_size, kv_axis="vision_embed",
                                            rngs=rngs)
        self.ffn = FeedForward(cfg, rngs=rngs)
        self.ffn_query = FeedForward(cfg, rngs=rngs)

    def __call__(self, x: Array, image_embeds: Array | None, key_mask: Array | None,
                 attention_bias: Array | None, query_length: int, deterministic: bool,
                 return_self_probs: bool = False, return_cross_probs: bool = False):
        """(hidden [B, L, D], self-attention probs or None, cross-attention probs or None)."""
        h, self_probs = self.attention(x, None, key_mask, None, deterministic=deterministic,
                                       return_probs=return_self_probs)
        cross_probs = None
        if query_length == 0:  # text-only: a plain BERT layer
            return self.ffn(h, deterministic=deterministic), self_probs, cross_probs
        hq = h[:, :query_length]
        if self.has_cross_attention:
            # The image tokens are never padded (the reference passes an all-ones image mask).
            hq, cross_probs = self.crossattention(hq, image_embeds, None, attention_bias,
                                                  deterministic=deterministic, return_probs=return_cross_probs)
        out = self.ffn_query(hq, deterministic=deterministic)
        if h.shape[1] > query_length:
            text = self.ffn(h[:, query_length:], deterministic=deterministic)
            out = jnp.concatenate([out, text], axis=1)
        return out, self_probs, cross_probs


class QFormer(nnx.Module):
    """The BLIP-2 Q-Former with its text embeddings (see the module docstring).

    Param layout (``/``-joined): ``word_embeddings/embedding``, ``position_embeddings/embedding``,
    ``layernorm/{scale,bias}``, ``layers/{i}/attention/{query,key,value}/kernel`` [D_in, H, Dh] with bias
    [H, Dh], ``layers/{i}/attention/out/kernel`` [H, Dh, D] with bias [D],
    ``layers/{i}/attention/norm/{scale,bias}``, ``layers/{i}/crossattention/...`` (cross layers only),
    ``layers/{i}/ffn/{intermediate,output}/{kernel,bias}``, ``layers/{i}/ffn/norm/{scale,bias}`` and the same
    under ``layers/{i}/ffn_query``. The learned query tokens belong to the owner (``Blip2.query_tokens``), so that
    other token sets (AdaFocal's probes) can be passed in their place.
    """

    def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        emb_init = nnx.initializers.normal(cfg.initializer_range)
        self.word_embeddings = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nnx.with_partitioning(emb_init, ("vocab", "embed")), rngs=rngs)
        self.position_embeddings = nnx.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nnx.with_partitioning(emb_init, (None, "embed")), rngs=rngs)
        self.layernorm = _layer_norm(cfg, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.hidden_dropout, rngs=rngs)
        self.layers = nnx.List([QFormerLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])

    def embed_text(self, input_ids: Array) -> Array:
        """Word + absolute position embeddings [B, T, D] (positions 0..T-1; no LayerNorm yet)."""
        t = input_ids.shape[1]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(f"text length {t} exceeds max_position_embeddings {self.cfg.max_position_embeddings}")
        return self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None]

    def __call__(self, query_embeds: Array | None = None, input_ids: Array | None = None,
                 attention_mask: Array | None = None, image_embeds: Array | None = None,
                 attention_bias: Array | None = None, *, deterministic: bool = True,
                 return_cross_attentions: bool = False, return_self_attentions: bool = False) -> QFormerOutput:
        """Runs the Q-Former.

        Args:
          query_embeds: [B, Q, D] or [Q, D] (broadcast over the batch) learned query tokens, or None (text-only).
          input_ids: [B, T] int token ids, or None (image-only).
          attention_mask: [B, T] text padding mask (1 = real token), or None (all real). It covers the *text*
            only: query positions are always visible. It masks keys, as in BERT.
          image_embeds: [B, N, encoder_hidden_size] image tokens (after ``ln_vision``); required with queries.
          attention_bias: additive cross-attention logits bias broadcastable to [B, heads, Q, N], used in every
            cross-attention layer after the 1/sqrt(d) scaling, before the softmax. Never used in self-attention.
          deterministic: disables dropout (dropout draws from the ``dropout`` stream of the construction Rngs).
          return_cross_attentions / return_self_attentions: also return the attention probabilities.
        """
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if query_embeds is None and input_ids is None:
            raise ValueError("QFormer needs query_embeds, input_ids or both")
        if query_embeds is None and (image_embeds is not None or attention_bias is not None):
            raise ValueError("image_embeds/attention_bias only act through the query tokens; pass query_embeds")
        if attention_mask is not None and input_ids is None:
            raise ValueError("attention_mask covers text tokens; it needs input_ids")

        parts = []
        query_length = 0
        if query_embeds is not None:
            if image_embeds is None:
                raise ValueError("query tokens cross-attend to the image: pass image_embeds")
            batch = image_embeds.shape[0]
            if query_embeds.ndim == 2:
                query_embeds = jnp.broadcast_to(query_embeds[None], (batch, *query_embeds.shape))
            query_length = query_embeds.shape[1]
            parts.append(query_embeds.astype(dtype))
            image_embeds = constrain(image_embeds.astype(dtype), ("batch", "length", "vision_embed"))
        if input_ids is not None:
            parts.append(self.embed_text(input_ids).astype(dtype))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        x = constrain(x, ("batch", "length", "embed"))
        x = self.dropout(self.layernorm(x), deterministic=deterministic)

        key_mask = None
        if attention_mask is not None:
            text_mask = jnp.asarray(attention_mask).astype(bool)
            if query_length:
                text_mask = jnp.concatenate([jnp.ones((x.shape[0], query_length), bool), text_mask], axis=1)
            key_mask = text_mask[:, None, None, :]

        def run(layer, h):
            return layer(h, image_embeds, key_mask, attention_bias, query_length, deterministic,
                         return_self_attentions, return_cross_attentions)

        if cfg.remat:
            run = nnx.remat(run)

        units = self.scan_units()
        if units and not (return_self_attentions or return_cross_attentions):
            return QFormerOutput(last_hidden_state=_scan(units, run, x, deterministic), query_length=query_length)
        self_probs, cross_probs = [], []
        for layer in self.layers:
            x, sp, cp = run(layer, x)
            self_probs.append(sp)
            if layer.has_cross_attention and query_length:
                cross_probs.append(cp)
        return QFormerOutput(
            last_hidden_state=x,
            query_length=query_length,
            cross_attentions=tuple(cross_probs) if return_cross_attentions else None,
            self_attentions=tuple(self_probs) if return_self_attentions else None,
        )

    def scan_units(self) -> list[tuple[QFormerLayer, ...]] | None:
        """The layers in units of ``cross_attention_freq`` (each starts with its cross-attention layer) when
        ``cfg.scan_layers`` and the units are at least two and whole; else None (the layers run one by one)."""
        freq, n = self.cfg.cross_attention_freq, len(self.layers)
        if not self.cfg.scan_layers or n % freq or n // freq < 2:
            return None
        return [tuple(self.layers[i:i + freq]) for i in range(0, n, freq)]


def _scan(units: list[tuple[QFormerLayer, ...]], run, x: Array, deterministic: bool) -> Array:
    """`x` through every unit in order, as one ``jax.lax.scan`` over the units' stacked variables. With dropout,
    each layer's stream advances as in the loop (the counters are written back), so the masks are the same."""
    splits = [nnx.split(unit) for unit in units]
    graphdef = splits[0][0]  # the units are alike: one graph for all
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits))

    def body(h, state):
        unit = nnx.merge(graphdef, state)
        for layer in unit:
            h = run(layer, h)[0]
        return h, nnx.state(unit, nnx.RngState)  # the dropout streams, not the (unchanged) params

    x, advanced = jax.lax.scan(body, x, stacked)
    if not deterministic:  # else nothing drew: nothing is written back (the variables may belong to an outer trace)
        for i, unit in enumerate(units):
            nnx.update(unit, jax.tree.map(lambda a: a[i], advanced))
    return x


def qformer_param_shapes(cfg: QFormerConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of all flat params of a :class:`QFormer`, by path (computed abstractly, nothing is allocated)."""
    from idmr_jax.weights.mapping import flatten_params

    abstract = nnx.eval_shape(lambda: QFormer(cfg, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in flatten_params(abstract).items()}
