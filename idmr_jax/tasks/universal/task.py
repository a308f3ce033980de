"""The universal retrieval task (config name ``universal``): an MLLM embedder trained with global InfoNCE on queries
and candidates of any modality, evaluated on M-BEIR, on IDMR's instance retrieval or on the demo's zero-shot CIR.

    query      = embedder(query prompt: its side's template for its modality, instruction and text, image if any)
    candidate  = embedder(candidate prompt)                                         -> [B, D], L2-normalised
    loss       = InfoNCE(query -> candidates of the whole global batch (+ each query's hard negatives)) / temp

The IDMR task (`idmr_jax.tasks.idmr`) is this task configured for IDMR's triplets (``data.format = "triplets"``,
``eval.benchmark = "idmr"``); InstructCIR (`configs/instructcir.py`) is two runs of it on caption pairs, then
instruction triplets. ``config.data.format``:

* ``"pairs"``: training pairs of any modality (`idmr_jax.tasks.universal.records.TrainingPair`, read by
  `idmr_jax.tasks.universal.pipeline`). A batch mixes modalities; each side's images are packed into
  ``data.image_slots`` slots per device, so text-only rows never enter the vision tower and a text-only side
  (slots 0) never runs it.
* ``"triplets"``: IDMR's (crop + caption, full image) triplets (`idmr_jax.tasks.idmr.pipeline`).

With ``config.loss.gradcache_chunk > 0`` every encoder call goes through GradCache (:mod:`idmr_jax.losses.gradcache`),
so the global batch's activations never coexist: IDMR's 64 rows per device in chunks of 8. A frozen vision tower
runs once per step outside GradCache. The trainer (`idmr_jax.train.trainer`) is the one AdaFocal uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from idmr_jax.losses import gradcache
from idmr_jax.losses.contrastive import BATCH_AXES, global_infonce
from idmr_jax.models.efficientnet import EfficientNetEncoderConfig
from idmr_jax.models.init_keys import seeded_model_rngs
from idmr_jax.tasks.universal import backbones
from idmr_jax.tasks.universal import model as embedder
from idmr_jax.train.state import frozen_filter

BATCH_KEYS = ("query", "cand", "hn")
DATA_FORMATS = ("pairs", "triplets")
BENCHMARKS = ("mbeir", "idmr", "demo_cir")
INIT_FORMATS = (*backbones.INIT_FORMATS.values(), "workdir")


class UniversalTask:
    """What the trainer needs for an MLLM embedder; see the module docstring and `idmr_jax.train.trainer.Task`."""

    # What a config without ``data.format`` / ``eval.benchmark`` means for this task (IDMR overrides both).
    default_data_format = "pairs"
    default_benchmark = "mbeir"

    def __init__(self, config: ml_collections.ConfigDict):
        # Cheap and pure: nothing is read from disk here. A "demo" source is made ready by
        # `idmr_jax.tasks.prepare_data`; the model config (which may read a checkpoint's config.json) is lazy.
        self.config = config
        self.frozen_patterns = embedder.frozen_patterns(config.model)
        self.data_format = config.data.get("format", self.default_data_format)
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"config.data.format = {self.data_format!r}: use one of {DATA_FORMATS}")

    @functools.cached_property
    def model_config(self):
        """`embedder.model_config` of the config, on first use (an ``hf_*`` init reads the checkpoint's
        config.json)."""
        return embedder.model_config(self.config)

    @functools.cached_property
    def image_tokens(self) -> int:
        """Image placeholder tokens per prompt: the vision grid's features at ``config.data.image_size``."""
        return self.model_config.tokens_per_image(self.config.data.image_size)

    @functools.cached_property
    def vision_frozen(self) -> bool:
        """True when no vision-tower parameter trains (found on an abstract model, built on first use). A frozen
        tower is then run once per step outside GradCache (its features become the cached inputs), instead of in
        both GradCache passes."""
        trainable = nnx.state(nnx.eval_shape(self.build_model), self._trainable())
        return not any(str(path[0]) == "vision" for path, _ in nnx.to_flat_state(trainable))

    # ------------------------------------------------------------------ model
    def build_model(self, seed=None) -> nnx.Module:
        """The embedder, initialised from `seed` (default ``config.seed``; a traced seed: see ``init_keys``)."""
        seed = self.config.seed if seed is None else seed
        return backbones.build_embedder(self.model_config, rngs=seeded_model_rngs(seed))

    def load_pretrained(self, state, mesh):
        """Packaged EfficientNet weights for the demo's vision tower; then ``config.model.init``: a transformers
        checkpoint of the backbone (``hf_llava`` / ``hf_internvl`` / ``hf_qwen2vl``) or another run's trained
        weights (``workdir``: its latest checkpoint, e.g. InstructCIR's stage 1 for stage 2; parameters it lacks,
        such as new LoRA factors, keep their initialisation)."""
        from idmr_jax.train.state import RANDOM_INIT, write_into_state

        flat = {}
        if isinstance(self.model_config.vision, EfficientNetEncoderConfig):
            from idmr_jax.weights.efficientnet import checkpoint_flat, pretrained_efficientnet_lite0

            encoder = pretrained_efficientnet_lite0(self.model_config.vision)
            flat.update({f"vision/{k}": np.asarray(v) for k, v in checkpoint_flat(encoder).items()})
        init = self.config.model.init
        if init.format in INIT_FORMATS and not init.path:
            raise ValueError(f"config.model.init.format is {init.format!r} but config.model.init.path is empty: give "
                             "the checkpoint folder (hf_*) or the training workdir (workdir), or set format='' "
                             "to train from scratch")
        source = init.format or "packaged weights"
        if init.format in backbones.INIT_FORMATS.values():
            backbone = backbones.backbone_of(self.config.model)
            if init.format != backbones.INIT_FORMATS[backbone]:
                raise ValueError(f"config.model.init.format {init.format!r} is not a {backbone} checkpoint: use "
                                 f"{backbones.INIT_FORMATS[backbone]!r} or set config.model.backbone")
            flat.update(backbones.checkpoint_params(backbone, init.path, self.model_config))
        elif init.format == "workdir":
            from idmr_jax.weights.workdir import restore

            checkpoint = restore(init.path)
            flat.update(checkpoint.flat)
            source = str(checkpoint.step_dir)
        elif init.format not in ("", RANDOM_INIT):
            raise ValueError(f"unknown config.model.init.format {init.format!r}; use "
                             f"{', '.join(backbones.INIT_FORMATS.values())}, workdir, random or ''")
        if not flat:
            return state
        state, loaded = write_into_state(state, flat, source=source)
        print(f"initialised {len(loaded)} tensors from {source}")
        return state

    # ------------------------------------------------------------------ loss
    def _trainable(self):
        return nnx.All(nnx.Param, nnx.Not(frozen_filter(self.frozen_patterns)))

    def _side_inputs(self, model: nnx.Module, batch: dict, prefix: str, chunk_size: int, mesh) -> dict:
        """The encoder inputs of one side, rows flattened (hard negatives ``[B, Nh, ...]`` -> ``[B*Nh, ...]``)."""
        ids = batch[f"{prefix}_ids"]
        x = {"ids": ids.reshape(-1, ids.shape[-1]), "mask": batch[f"{prefix}_mask"].reshape(-1, ids.shape[-1])}
        rows = x["ids"].shape[0]
        if f"{prefix}_has_image" not in batch:  # every row has an image (IDMR's triplets, the fake source)
            pixels = batch[f"{prefix}_pixels"]
            x["pixels"] = pixels.reshape(-1, *pixels.shape[-3:])
            if self.vision_frozen:
                n = rows // chunk_size if chunk_size else 1
                x["vision"] = embedder.frozen_vision_features(model, x.pop("pixels"), n)
            return x
        if f"{prefix}_pixels" not in batch:  # a text-only side: no image slots, the vision tower never runs
            return x
        from idmr_jax.tasks.universal.pipeline import batch_shards

        slots = batch[f"{prefix}_pixels"]
        x["has_image"] = batch[f"{prefix}_has_image"].reshape(-1)
        if self.vision_frozen:  # the tower runs once on the slots, outside GradCache
            n = slots.shape[0] // chunk_size if chunk_size and slots.shape[0] % chunk_size == 0 else 1
            features = embedder.frozen_vision_features(model, slots, n)
        elif not chunk_size:  # the tower trains on the slots
            features = model.vision_features(slots)
        else:
            # A trainable tower under GradCache must run inside each row chunk: the slots go back to their rows
            # (text rows get zero images, whose features the splice never reads, so they get no gradient).
            x["pixels"] = embedder.rows_from_slots(slots, x["has_image"], batch_shards(mesh))
            return x
        x["vision"] = embedder.rows_from_slots(features, x["has_image"], batch_shards(mesh))
        return x

    def loss_fn(self, model: nnx.Module, batch: dict, rng: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """InfoNCE of queries against the global batch's candidates (+ hard negatives), optionally via GradCache."""
        lc = self.config.loss
        chunk = int(lc.gradcache_chunk)
        keys = dict(zip(BATCH_KEYS, jax.random.split(rng, len(BATCH_KEYS))))
        size = gradcache.global_chunk_size(chunk, mesh, BATCH_AXES) if chunk > 0 else 0

        def encode(prefix: str) -> jax.Array:
            lead = batch[f"{prefix}_ids"].shape[:-1]
            x = self._side_inputs(model, batch, prefix, size, mesh)
            if chunk > 0:
                out = gradcache.nnx_cached_encode(model, embedder.encode_rows, x, keys[prefix], chunk_size=size,
                                                  trainable=self._trainable())
            else:
                out = embedder.encode_rows(model, x, keys[prefix])
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
        if self.data_format == "pairs":
            from idmr_jax.tasks.universal import pipeline as pairs

            return pairs.train_iterator(self)
        if d.num_hard_negatives:
            raise ValueError("IDMR's triplets carry no hard negatives: set data.num_hard_negatives=0, or train on "
                             "pairs (data.format='pairs') whose records list them")
        from idmr_jax.tasks.idmr import pipeline

        return pipeline.train_iterator(self.config, self.prompt_spec("query"), self.prompt_spec("candidate"),
                                       d.image_size)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: nnx.Module, workdir: epath.Path, step: int) -> dict:
        """``config.eval.benchmark``: "mbeir" (converted M-BEIR shards in ``data.val_dir``), "idmr" (instance
        retrieval R@K / R_ID@K on IDMR triplets or the fake pool) or "demo_cir" (the demo's zero-shot CIR)."""
        benchmark = self.config.eval.get("benchmark", self.default_benchmark)
        if benchmark not in BENCHMARKS:
            raise ValueError(f"config.eval.benchmark = {benchmark!r}: use one of {BENCHMARKS}")
        if benchmark == "idmr":
            from idmr_jax.tasks.idmr.evaluate import evaluate

            return evaluate(self, model, epath.Path(workdir))
        if benchmark == "demo_cir":
            from idmr_jax.tasks.universal.demo_eval import evaluate_demo_cir

            return evaluate_demo_cir(self, model, workdir)
        from idmr_jax.tasks.universal.evaluate import evaluate_mbeir

        return evaluate_mbeir(self, model, workdir)


def family_task(config: ml_collections.ConfigDict) -> str:
    """The task whose model this one builds (``tasks.model_task_name``): the IDMR embedder's (precision parts and
    weight formats are registered under "idmr")."""
    del config
    return "idmr"


model_config = embedder.model_config
# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = UniversalTask
MODEL_KIND = "llava"


def model_kind(config: ml_collections.ConfigDict) -> str:
    """The saved model kind of the config's backbone (``llava``, ``internvl`` or ``qwen2vl``)."""
    return backbones.model_kind(model_config(config))
