"""The OACIR task (config name ``oacir``) with the AdaFocal model: model from the config, global-batch InfoNCE, data
and evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from idmr_jax import precision
from idmr_jax.losses.contrastive import global_infonce
from idmr_jax.models import adafocal
from idmr_jax.models.blip2 import Blip2Config, ln_vision_eps_for
from idmr_jax.models.crm import CRMConfig
from idmr_jax.models.efficientnet import EfficientNetEncoderConfig, EfficientNetLiteConfig
from idmr_jax.models.init_keys import seeded_model_rngs
from idmr_jax.models.qformer import QFormerConfig
from idmr_jax.models.vit import vit_config
from idmr_jax.tasks.oacir import fake


def model_config(config: ml_collections.ConfigDict) -> adafocal.AdaFocalConfig:
    """AdaFocalConfig from ``config.model``, with every part's dtypes from ``config.precision``
    (:mod:`idmr_jax.precision`)."""
    m = _model_fields(config)
    dtypes = functools.partial(_dtypes, config)
    v = m.vision
    if v.get("kind", "vit") == "efficientnet":
        # The laptop demo's frozen ImageNet EfficientNet-Lite0 (packaged weights), stride-16 map as tokens.
        vision = EfficientNetEncoderConfig(backbone=EfficientNetLiteConfig(**dtypes("vision", m.freeze_vision)),
                                           feature_stride=v.get("feature_stride", 16))
    else:
        vision = vit_config(v.variant, image_size=v.image_size, remat=v.remat, scan=v.scan,
                            **dtypes("vision", m.freeze_vision))
    q = m.qformer
    qformer = QFormerConfig(
        hidden_size=q.hidden_size, num_layers=q.num_layers, num_heads=q.num_heads,
        intermediate_size=q.intermediate_size, cross_attention_freq=q.cross_attention_freq,
        encoder_hidden_size=vision.width, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        initializer_range=q.get("initializer_range", 0.02), hidden_dropout=q.get("dropout", 0.1),
        attention_dropout=q.get("dropout", 0.1), remat=bool(q.get("remat", False)),
        scan_layers=bool(q.get("scan", False)), **dtypes("qformer", False))
    blip2 = Blip2Config(vision=vision, qformer=qformer, num_query_tokens=m.num_query_tokens,
                        embed_dim=m.embed_dim, temp_init=m.temp_init,
                        ln_vision_eps=ln_vision_eps_for(m.init.format, vision))
    c = m.caam
    crm = CRMConfig(hidden_size=q.hidden_size, num_probes=c.num_probes, aggregator=c.aggregator,
                    num_layers=c.num_layers, num_heads=c.num_heads, ffn_dim=c.ffn_dim, dropout=c.dropout,
                    head_hidden=c.head_hidden, num_outputs=1 if c.beta == "scalar" else m.num_query_tokens,
                    **dtypes("caam", False))
    return adafocal.AdaFocalConfig(blip2=blip2, crm=crm, beta_mode=m.beta_mode, fixed_beta=m.fixed_beta,
                                   image_size=v.image_size)


def _model_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.model``; a clear error for a caller still passing ``config.model`` itself."""
    if "model" not in config:
        raise TypeError("model_config takes the whole config (config.precision sets the dtypes), not config.model")
    return config.model


def _dtypes(config: ml_collections.ConfigDict, part: str, frozen: bool) -> dict[str, str]:
    """``dtype`` / ``param_dtype`` keyword arguments of a model config for `part` under the precision policy."""
    return dict(dtype=precision.dtype_name(precision.compute_dtype(config, part)),
                param_dtype=precision.dtype_name(precision.param_dtype(config, part, frozen=frozen)))


def _masked_mean_std(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = mask.astype(jnp.float32)[:, None] * jnp.ones_like(x)
    n = jnp.maximum(w.sum(), 1.0)
    mean = (x * w).sum() / n
    return mean, jnp.sqrt(((x - mean) ** 2 * w).sum() / n)


def _image_embeds(model: adafocal.AdaFocal, batch: dict, side: str) -> jax.Array:
    """``ln_vision`` tokens of the batch's `side` ("ref" | "tgt") images: from cached frozen-encoder tokens
    (``<side>_tokens``, see `feature_cache`) or from pixels (``<side>_pixels``)."""
    tokens = batch.get(f"{side}_tokens")
    return model.embed_tokens(tokens) if tokens is not None else model.encode_image(batch[f"{side}_pixels"])


class OacirTask:
    """What the trainer needs for OACIR with AdaFocal; see :class:`idmr_jax.train.trainer.Task`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config  # a "demo" source is made ready by `idmr_jax.tasks.prepare_data`, not here
        self.model_config = model_config(config)
        frozen = []
        if config.model.freeze_vision:
            frozen.append(r"^blip2/vision/")
        if config.model.beta_mode == "adaptive" and not config.model.caam.probes_trainable:
            frozen.append(r"^probe_tokens$")
        self.frozen_patterns = tuple(frozen)
        # config.train.cache_frozen_vision: frozen-encoder tokens computed once (refused unless they are fixed).
        self.feature_cache = None
        if config.get("train", {}).get("cache_frozen_vision", False):
            from idmr_jax.tasks.oacir import feature_cache, pipeline

            self.feature_cache = feature_cache.FrozenFeatureCache(config, pipeline.image_spec(self.model_config))

    # ------------------------------------------------------------------ model
    def build_model(self, seed=None) -> adafocal.AdaFocal:
        """The model, initialised from `seed` (default ``config.seed``; a traced seed: see ``init_keys``)."""
        seed = self.config.seed if seed is None else seed
        return adafocal.AdaFocal(self.model_config, rngs=seeded_model_rngs(seed))

    def load_pretrained(self, state, mesh):
        """Initial weights from ``config.model.init`` and packaged vision weights (none: the random init)."""
        from idmr_jax.tasks.oacir import pretrained

        return pretrained.load_into_state(state, self, mesh)

    def prepare_training(self, model: adafocal.AdaFocal) -> None:
        """Before the first step, with the weights the run trains from: the frozen-encoder token pass, if cached."""
        if self.feature_cache is not None:
            self.feature_cache.compute(model)

    # ------------------------------------------------------------------ loss
    def loss_fn(self, model: adafocal.AdaFocal, batch: dict, rng: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """Query->target InfoNCE over the global batch (each query sees every target on every device)."""
        nnx.reseed(model, dropout=rng)
        ref, tgt = _image_embeds(model, batch, "ref"), _image_embeds(model, batch, "tgt")
        query, beta = model.query_features(ref, batch["input_ids"], batch["attention_mask"], batch["box_mask"],
                                           deterministic=False)
        targets = model.target_features(tgt, deterministic=False)
        lc = self.config.loss
        loss = global_infonce(query, targets, model.temp, mesh=mesh, direction=lc.direction,
                              label_smoothing=lc.label_smoothing, chunked=lc.chunked)
        beta_mean, beta_std = _masked_mean_std(beta, batch["box_mask"].max(-1) > 0)
        return loss, {"temperature": model.temp, "beta_mean": beta_mean, "beta_std": beta_std}

    def bind_mesh(self, mesh):
        """The loss with its mesh bound (the loss shards over the mesh's batch axes)."""
        return functools.partial(self.loss_fn, mesh=mesh)

    # ------------------------------------------------------------------ data
    def fake_spec(self) -> fake.FakeSpec:
        """The synthetic pool's spec (``data.source == "fake"``): the model's input size and patch grid."""
        d = self.config.data
        size = self.model_config.image_size  # one place for the input size: the model config, as the real pipeline
        gh, _ = adafocal.grid(self.model_config)
        return fake.FakeSpec(pool=d.fake_pool, image_size=size, patch_size=size // gh,
                             text_len=d.max_text_len, vocab_size=self.model_config.blip2.qformer.vocab_size,
                             seed=d.shuffle_seed)

    def train_iterator(self):
        d = self.config.data
        if d.source == "fake":
            return fake.FakeIterator(self.fake_spec(), d.batch_size, jax.process_index(), jax.process_count())
        if self.feature_cache is not None:
            return self.feature_cache.train_iterator()
        from idmr_jax.tasks.oacir import pipeline

        return pipeline.train_iterator(self.config, self.model_config)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: adafocal.AdaFocal, workdir: epath.Path, step: int) -> dict:
        """OACIR protocol; writes WORKDIR/eval/{metrics.json, rankings.jsonl, *.png}."""
        from idmr_jax.tasks.oacir.evaluate import evaluate_arrayrecord, evaluate_fake

        if self.config.data.source == "fake":
            return evaluate_fake(model, self.fake_spec(), self.config, workdir)
        tokens = self.feature_cache.val_tokens if self.feature_cache is not None else None
        return evaluate_arrayrecord(model, self.config, self.model_config, workdir, tokens=tokens)


# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = OacirTask
MODEL_KIND = "adafocal"
