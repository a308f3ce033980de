"""The IDMR task (and its LamRA / InstructCIR variants): a LLaVA-style embedder trained with global InfoNCE.

    query     = LlavaEmbedder(crop image + instruction with the caption)      -> [B, D], L2-normalised
    candidate = LlavaEmbedder(full image + "Represent the given image.")     -> [B, D]
    loss      = InfoNCE(query -> candidates of the whole global batch (+ hard-negative columns)) / temperature

With ``config.loss.gradcache_chunk > 0`` every encoder call goes through GradCache
(:mod:`idmr_jax.losses.gradcache`), so the global batch's activations never coexist: IDMR's 64 rows per device
in chunks of 8. The trainer (`idmr_jax.train.trainer`) is the one AdaFocal uses; this class only supplies the
model, the loss, the data and the evaluation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from idmr_jax import precision
from idmr_jax.losses import gradcache
from idmr_jax.losses.contrastive import BATCH_AXES, global_infonce
from idmr_jax.models import lora as lora_lib
from idmr_jax.models import pooling
from idmr_jax.models.decoder_lm import DecoderLMConfig
from idmr_jax.models.efficientnet import EfficientNetEncoderConfig, EfficientNetLiteConfig
from idmr_jax.models.init_keys import model_rngs
from idmr_jax.models.llava import LlavaConfig, LlavaEmbedder, splice_image_features
from idmr_jax.models.vision import vision_grid
from idmr_jax.models.vit import vit_config
from idmr_jax.sharding import constrain
from idmr_jax.train.state import frozen_filter

BATCH_KEYS = ("query", "cand", "hn")


def uses_lora(m: ml_collections.ConfigDict) -> bool:
    """Whether ``config.model`` trains LoRA adapters (a ``lora`` entry with rank > 0) rather than the LM in full."""
    return bool(m.get("lora") and m.lora.rank)


def lora_config(config: ml_collections.ConfigDict) -> lora_lib.LoRAConfig | None:
    """``config.model.lora`` as a LoRAConfig (its branch in the ``lora`` part's compute dtype, its factors float32:
    they train); None when absent or rank 0 (full tuning)."""
    if not uses_lora(config.model):
        return None
    lc = config.model.lora
    return lora_lib.LoRAConfig(rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=tuple(lc.targets),
                               dtype=_name(precision.compute_dtype(config, "lora")),
                               param_dtype=_name(precision.param_dtype(config, "lora", frozen=False)))


def _name(dtype) -> str:
    return precision.dtype_name(dtype)


def _part_dtypes(config: ml_collections.ConfigDict) -> dict[str, dict[str, str]]:
    """{part: {"dtype", "param_dtype"}} under ``config.precision``; a part is frozen as `frozen_patterns` says."""
    m = config.model
    lora = uses_lora(m)
    frozen = {"vision": lora or m.freeze_vision, "projector": not m.train_projector, "text": lora}
    return {part: dict(dtype=_name(precision.compute_dtype(config, part)),
                       param_dtype=_name(precision.param_dtype(config, part, frozen=is_frozen)))
            for part, is_frozen in frozen.items()}


def model_config(config: ml_collections.ConfigDict) -> LlavaConfig:
    """LlavaConfig from ``config.model`` and ``config.precision`` (:mod:`idmr_jax.precision`): the sizes of
    ``init.path``'s config.json when a transformers LLaVA checkpoint is given (``init.format == "hf_llava"``), else
    the sizes in the config."""
    if "model" not in config:
        raise TypeError("model_config takes the whole config (config.precision sets the dtypes), not config.model")
    m = config.model
    v, t = m.vision, m.text
    lora = lora_config(config)
    dt = _part_dtypes(config)
    projector = dict(projector_dtype=dt["projector"]["dtype"], projector_param_dtype=dt["projector"]["param_dtype"])
    if m.init.format == "hf_llava" and m.init.path:
        import dataclasses

        from idmr_jax.weights import llava, torch_io

        cfg = llava.llava_config_from_hf(torch_io.read_hf_config(m.init.path))
        text = dataclasses.replace(cfg.text, remat=t.remat, scan=t.scan, lora=lora, **dt["text"])
        vision = dataclasses.replace(cfg.vision, **dt["vision"])
        return dataclasses.replace(cfg, vision=vision, text=text, pooling=m.pooling,
                                   pooling_token_id=m.get("pooling_token_id"), **projector)
    if v.kind == "efficientnet":
        vision = EfficientNetEncoderConfig(backbone=EfficientNetLiteConfig(**dt["vision"]),
                                           feature_stride=v.feature_stride)
        layer = None
    else:
        vision = vit_config(v.variant, image_size=v.image_size, remat=v.remat, scan=v.scan, **dt["vision"])
        layer = m.vision_feature_layer
    text = DecoderLMConfig(
        family=t.family, vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, rope_theta=t.rope_theta,
        rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings, remat=t.remat, scan=t.scan, lora=lora,
        initializer_range=t.initializer_range, **dt["text"])
    return LlavaConfig(vision=vision, text=text, image_token_id=m.image_token_id, vision_feature_layer=layer,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       pooling=m.pooling, pooling_token_id=m.get("pooling_token_id"), normalize=True, **projector)


def frozen_patterns(m: ml_collections.ConfigDict) -> tuple[str, ...]:
    """LoRA: everything but the adapters (and the projector if ``train_projector``). Else the vision tower."""
    if uses_lora(m):
        return lora_lib.frozen_patterns(extra_trainable=[r"^projector/"] if m.train_projector else [])
    frozen = [r"^vision/"] if m.freeze_vision else []
    if not m.train_projector:
        frozen.append(r"^projector/")
    return tuple(frozen)


def embed_from_features(model: LlavaEmbedder, features: jax.Array, ids: jax.Array, mask: jax.Array, *,
                        deterministic: bool = True) -> jax.Array:
    """``model.embed`` from precomputed ``model.vision_features(pixels)`` (the same steps after the vision tower)."""
    cfg = model.cfg
    image = constrain(model.projector(features), ("batch", "length", "embed"))
    embeds = splice_image_features(model.lm.embed(ids), ids, cfg.image_token_id, image)
    hidden = model.lm(inputs_embeds=embeds, attention_mask=mask, deterministic=deterministic)
    return pooling.pool(hidden, mask, ids, method=cfg.pooling, token_id=cfg.pooling_token_id,
                        normalize=cfg.normalize)


def _encode(model: LlavaEmbedder, x: dict, key) -> jax.Array:
    """One (chunk of a) batch through the embedder; dropout (LoRA's) seeded by `key`. With ``x["vision"]`` (the
    frozen tower's features, computed once outside GradCache) the vision tower is skipped."""
    if key is not None:
        nnx.reseed(model, dropout=key, policy="match_shape")
    if "vision" in x:
        return embed_from_features(model, x["vision"], x["ids"], x["mask"], deterministic=key is None)
    return model.embed(x["ids"], x["mask"], x["pixels"], deterministic=key is None)


def frozen_vision_features(model: LlavaEmbedder, pixels: jax.Array, num_chunks: int) -> jax.Array:
    """The frozen tower's features, in GradCache's chunks (bounded activation memory), without gradient."""
    if num_chunks <= 1:
        return jax.lax.stop_gradient(model.vision_features(pixels))
    feats = jax.lax.map(model.vision_features, gradcache.to_chunks(pixels, num_chunks))
    return jax.lax.stop_gradient(gradcache.from_chunks(feats))


class IdmrTask:
    """What the trainer needs for an MLLM embedder; see :class:`idmr_jax.train.trainer.Task`."""

    def __init__(self, config: ml_collections.ConfigDict):
        # Cheap and pure: nothing is read from disk here. A "demo" source is made ready by
        # `idmr_jax.tasks.prepare_data`; the model config (which may read a checkpoint's config.json) is lazy.
        self.config = config
        self.frozen_patterns = frozen_patterns(config.model)

    @functools.cached_property
    def model_config(self) -> LlavaConfig:
        """`model_config` of the config, on first use (``hf_llava`` reads the checkpoint's config.json)."""
        return model_config(self.config)

    @functools.cached_property
    def image_tokens(self) -> int:
        """Image placeholder tokens per prompt: the vision grid's features at ``config.data.image_size``."""
        return self.model_config.image_tokens(vision_grid(self.model_config.vision, self.config.data.image_size))

    @functools.cached_property
    def vision_frozen(self) -> bool:
        """True when no vision-tower parameter trains (found on an abstract model, built on first use). A frozen
        tower is then run once per step outside GradCache (its features become the cached inputs), instead of in
        both GradCache passes."""
        trainable = nnx.state(nnx.eval_shape(self.build_model), self._trainable())
        return not any(str(path[0]) == "vision" for path, _ in nnx.to_flat_state(trainable))

    # ------------------------------------------------------------------ model
    def build_model(self) -> LlavaEmbedder:
        seed = self.config.seed
        return LlavaEmbedder(self.model_config, rngs=model_rngs(params=seed, dropout=seed + 1))

    def load_pretrained(self, state, mesh):
        """Packaged EfficientNet weights for the demo's vision tower; a transformers LLaVA with ``hf_llava``."""
        from idmr_jax.train.state import RANDOM_INIT, write_into_state

        flat = {}
        if isinstance(self.model_config.vision, EfficientNetEncoderConfig):
            from idmr_jax.weights.efficientnet import checkpoint_flat, pretrained_efficientnet_lite0

            encoder = pretrained_efficientnet_lite0(self.model_config.vision)
            flat.update({f"vision/{k}": np.asarray(v) for k, v in checkpoint_flat(encoder).items()})
        init = self.config.model.init
        if init.format == "hf_llava":
            if not init.path:
                raise ValueError("config.model.init.format is 'hf_llava' but config.model.init.path is empty: give "
                                 "the transformers LLaVA checkpoint folder, or set format='' to train from scratch")
            from idmr_jax.weights.llava import convert_state_dict
            from idmr_jax.weights.torch_io import load_torch_state_dict

            converted, _ = convert_state_dict(load_torch_state_dict(init.path, float_dtype=np.float32),
                                              self.model_config, source=init.path)
            flat.update(converted)
        elif init.format not in ("", RANDOM_INIT):
            raise ValueError(f"unknown config.model.init.format {init.format!r}; use hf_llava, random or ''")
        if not flat:
            return state
        state, loaded = write_into_state(state, flat, source=init.format or "packaged weights")
        print(f"initialised {len(loaded)} tensors from {init.format or 'packaged'} weights")
        return state

    # ------------------------------------------------------------------ loss
    def _trainable(self):
        return nnx.All(nnx.Param, nnx.Not(frozen_filter(self.frozen_patterns)))

    def loss_fn(self, model: LlavaEmbedder, batch: dict, rng: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """InfoNCE of queries against the global batch's candidates (+ hard negatives), optionally via GradCache."""
        lc = self.config.loss
        chunk = int(lc.gradcache_chunk)
        keys = dict(zip(BATCH_KEYS, jax.random.split(rng, len(BATCH_KEYS))))

        def encode(prefix: str) -> jax.Array:
            x = {"pixels": batch[f"{prefix}_pixels"], "ids": batch[f"{prefix}_ids"], "mask": batch[f"{prefix}_mask"]}
            lead = x["ids"].shape[:-1]
            x = jax.tree.map(lambda a: a.reshape(-1, *a.shape[len(lead):]), x)  # hard negatives: [B*Nh, ...]
            size = gradcache.global_chunk_size(chunk, mesh, BATCH_AXES) if chunk > 0 else 0
            if self.vision_frozen:
                n = x["ids"].shape[0] // size if size else 1
                x["vision"] = frozen_vision_features(model, x.pop("pixels"), n)
            if chunk > 0:
                out = gradcache.nnx_cached_encode(model, _encode, x, keys[prefix], chunk_size=size,
                                                  trainable=self._trainable())
            else:
                out = _encode(model, x, keys[prefix])
            # In the LM's compute dtype: under bf16 the loss gathers bf16 features (its logits are float32).
            return out.reshape(*lead, -1)

        query, cand = encode("query"), encode("cand")
        hn = encode("hn") if "hn_ids" in batch else None
        loss = global_infonce(query, cand, lc.temperature, mesh=mesh, hard_negatives=hn, direction=lc.direction,
                              label_smoothing=lc.label_smoothing, chunked=lc.chunked)
        pos = jnp.sum(query.astype(jnp.float32) * cand.astype(jnp.float32), axis=-1).mean()
        return loss, {"temperature": jnp.float32(lc.temperature), "pos_cosine": pos}

    def bind_mesh(self, mesh):
        return functools.partial(self.loss_fn, mesh=mesh)

    # ------------------------------------------------------------------ data
    def prompt_spec(self, side: str = "query"):
        """Token layout of query (``data.max_len``) or candidate (``data.candidate_max_len``, 0 = same) prompts."""
        from idmr_jax.tasks.idmr.pipeline import PromptSpec

        d = self.config.data
        opt = lambda v: None if v is None or v < 0 else int(v)  # noqa: E731
        length = d.max_len if side == "query" or not d.get("candidate_max_len") else d.candidate_max_len
        spec = PromptSpec(image_token_id=self.model_config.image_token_id, image_tokens=self.image_tokens,
                          max_length=length, padding_side=d.padding_side, bos_id=opt(d.bos_id),
                          eos_id=opt(d.eos_id), pad_id=d.pad_id)
        vocab = self.model_config.text.vocab_size
        for name in ("image_token_id", "bos_id", "eos_id", "pad_id"):
            value = getattr(spec, name)
            if value is not None and not 0 <= value < vocab:
                # An out-of-range id would silently embed as NaN / garbage under jit.
                raise ValueError(f"prompt {name}={value} is outside the LM vocabulary ({vocab}); fix config.data / "
                                 "config.model.image_token_id")
        return spec

    def fake_spec(self):
        """The synthetic triplet pool's spec (``data.source == "fake"``; also the fake evaluation's)."""
        from idmr_jax.tasks.idmr.fake import FakeTripletSpec

        d = self.config.data
        return FakeTripletSpec(prompt=self.prompt_spec("query"), image_size=d.image_size, instances=d.fake_instances,
                               scenes=d.fake_scenes, scenes_per_instance=d.fake_scenes_per_instance,
                               vocab_size=self.model_config.text.vocab_size,
                               num_hard_negatives=d.num_hard_negatives, seed=d.shuffle_seed)

    def train_iterator(self):
        d = self.config.data
        if d.source == "fake":
            from idmr_jax.tasks.idmr.fake import FakeTripletIterator

            return FakeTripletIterator(self.fake_spec(), d.batch_size, jax.process_index(), jax.process_count())
        if d.num_hard_negatives:
            raise ValueError("hard negatives are produced by the fake source only; set data.num_hard_negatives=0")
        from idmr_jax.tasks.idmr import pipeline

        return pipeline.train_iterator(self.config, self.prompt_spec("query"), self.prompt_spec("candidate"),
                                       d.image_size)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: LlavaEmbedder, workdir: epath.Path, step: int) -> dict:
        """Instance retrieval R@K / R_ID@K; writes WORKDIR/eval/metrics.json and rankings.jsonl."""
        from idmr_jax.tasks.idmr.evaluate import evaluate

        return evaluate(self, model, epath.Path(workdir))


# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = IdmrTask
MODEL_KIND = "llava"
