"""The OACIR task (config name ``oacir``) with the AdaFocal model: model from the config, global-batch InfoNCE, data
and evaluation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from idmr_jax.losses.contrastive import global_infonce
from idmr_jax.models import adafocal
from idmr_jax.models.blip2 import Blip2Config, ln_vision_eps_for
from idmr_jax.models.crm import CRMConfig
from idmr_jax.models.efficientnet import EfficientNetEncoderConfig
from idmr_jax.models.qformer import QFormerConfig
from idmr_jax.models.vit import vit_config
from idmr_jax.tasks.oacir import fake


def model_config(m: ml_collections.ConfigDict) -> adafocal.AdaFocalConfig:
    """AdaFocalConfig from ``config.model``."""
    v = m.vision
    if v.get("kind", "vit") == "efficientnet":
        # The laptop demo's frozen ImageNet EfficientNet-Lite0 (packaged weights), stride-16 map as tokens.
        vision = EfficientNetEncoderConfig(feature_stride=v.get("feature_stride", 16))
    else:
        vision = vit_config(v.variant, image_size=v.image_size, dtype=v.dtype, remat=v.remat, scan=v.scan)
    q = m.qformer
    qformer = QFormerConfig(
        hidden_size=q.hidden_size, num_layers=q.num_layers, num_heads=q.num_heads,
        intermediate_size=q.intermediate_size, cross_attention_freq=q.cross_attention_freq,
        encoder_hidden_size=vision.width, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, dtype=q.dtype,
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
        initializer_range=q.get("initializer_range", 0.02), hidden_dropout=q.get("dropout", 0.1),
        attention_dropout=q.get("dropout", 0.1))
    blip2 = Blip2Config(vision=vision, qformer=qformer, num_query_tokens=m.num_query_tokens,
                        embed_dim=m.embed_dim, temp_init=m.temp_init,
                        ln_vision_eps=ln_vision_eps_for(m.init.format, vision))
    c = m.caam
    crm = CRMConfig(hidden_size=q.hidden_size, num_probes=c.num_probes, aggregator=c.aggregator,
                    num_layers=c.num_layers, num_heads=c.num_heads, ffn_dim=c.ffn_dim, dropout=c.dropout,
                    head_hidden=c.head_hidden, num_outputs=1 if c.beta == "scalar" else m.num_query_tokens)
    return adafocal.AdaFocalConfig(blip2=blip2, crm=crm, beta_mode=m.beta_mode, fixed_beta=m.fixed_beta,
                                   image_size=v.image_size)


def _masked_mean_std(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = mask.astype(jnp.float32)[:, None] * jnp.ones_like(x)
    n = jnp.maximum(w.sum(), 1.0)
    mean = (x * w).sum() / n
    return mean, jnp.sqrt(((x - mean) ** 2 * w).sum() / n)


class OacirTask:
    """What the trainer needs for OACIR with AdaFocal; see :class:`idmr_jax.train.trainer.Task`."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config  # a "demo" source is made ready by `idmr_jax.tasks.prepare_data`, not here
        self.model_config = model_config(config.model)
        frozen = []
        if config.model.freeze_vision:
            frozen.append(r"^blip2/vision/")
        if config.model.beta_mode == "adaptive" and not config.model.caam.probes_trainable:
            frozen.append(r"^probe_tokens$")
        self.frozen_patterns = tuple(frozen)

    # ------------------------------------------------------------------ model
    def build_model(self) -> adafocal.AdaFocal:
        seed = self.config.seed
        return adafocal.AdaFocal(self.model_config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    def load_pretrained(self, state, mesh):
        """Initial weights from ``config.model.init`` and packaged vision weights (none: the random init)."""
        from idmr_jax.tasks.oacir import pretrained

        return pretrained.load_into_state(state, self, mesh)

    # ------------------------------------------------------------------ loss
    def loss_fn(self, model: adafocal.AdaFocal, batch: dict, rng: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """Query->target InfoNCE over the global batch (each query sees every target on every device)."""
        nnx.reseed(model, dropout=rng)
        ref = model.encode_image(batch["ref_pixels"])
        tgt = model.encode_image(batch["tgt_pixels"])
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
        from idmr_jax.tasks.oacir import pipeline

        return pipeline.train_iterator(self.config, self.model_config)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: adafocal.AdaFocal, workdir: epath.Path, step: int) -> dict:
        """OACIR protocol; writes WORKDIR/eval/{metrics.json, rankings.jsonl, *.png}."""
        from idmr_jax.tasks.oacir.evaluate import evaluate_arrayrecord, evaluate_fake

        if self.config.data.source == "fake":
            return evaluate_fake(model, self.fake_spec(), self.config, workdir)
        return evaluate_arrayrecord(model, self.config, self.model_config, workdir)


# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = OacirTask
MODEL_KIND = "adafocal"
