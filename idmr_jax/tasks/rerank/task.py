"""The reranker task (config name ``rerank``, `configs/rerank.py`): LamRA's joint pointwise + listwise training.

The reranker is the embedder's MLLM (`idmr_jax.tasks.universal`: same model, same weights formats) with its own
LoRA on the LM (``config.model.lora``); everything else is frozen. It starts from an embedder's workdir
(``model.init.format = "workdir"``): that run's own LoRA, if any, is merged into the base kernels first, so the
reranker's adapters start fresh on top of the trained embedder. Per training pair (`idmr_jax.tasks.rerank.pipeline`):

    pointwise  CE over the {"Yes", "No"} logits at the last attended position of (query, positive) -> Yes and
               (query, negative) -> No
    listwise   CE over the K index tokens "1".."K" at the last position of the listwise prompt, target = the
               positive's shuffled number; index slots beyond the example's K get no probability
    loss       loss.pointwise_weight * pointwise + loss.listwise_weight * listwise

Only the last position of each prompt goes through the LM head (`idmr_jax.tasks.rerank.scoring.last_logits`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from idmr_jax.models import lora as lora_lib
from idmr_jax.tasks.rerank.prompts import AnswerIds, answer_ids, load_rerank_prompts
from idmr_jax.tasks.rerank.scoring import last_logits
from idmr_jax.tasks.universal import model as embedder
from idmr_jax.tasks.universal.task import UniversalTask
from idmr_jax.tasks.universal.task import family_task as universal_family
from idmr_jax.tasks.universal.task import model_kind as universal_model_kind

PREFIXES = ("point", "list")


def joint_loss(point_last: jax.Array, point_label: jax.Array, list_last: jax.Array, list_target: jax.Array,
               list_size: jax.Array, answers: AnswerIds, *, pointwise_weight: float = 1.0,
               listwise_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """LamRA's joint loss from the last-position logits: ``point_last [N, V]`` with ``point_label [N]`` (1 = Yes,
    0 = No), ``list_last [B, V]`` with ``list_target [B]`` (0-based) over ``list_size [B]`` candidates (index tokens
    ``answers.index``; slots >= size are masked). Returns (loss, metrics: pointwise / listwise loss and accuracy)."""
    point_last, list_last = point_last.astype(jnp.float32), list_last.astype(jnp.float32)
    pair = jnp.stack([point_last[:, answers.yes], point_last[:, answers.no]], axis=-1)  # [N, 2]: Yes, No
    point_target = jnp.where(point_label == 1, 0, 1)
    point_logp = jax.nn.log_softmax(pair, axis=-1)
    point_ce = -jnp.take_along_axis(point_logp, point_target[:, None], axis=-1)[:, 0]
    picked = jnp.take(list_last, jnp.asarray(answers.index, jnp.int32), axis=-1)  # [B, K_max]
    shown = jnp.arange(picked.shape[-1])[None, :] < list_size[:, None]
    # -inf: exp gives exactly 0, so unused slots take no probability and get no gradient.
    list_logp = jax.nn.log_softmax(jnp.where(shown, picked, -jnp.inf), axis=-1)
    list_ce = -jnp.take_along_axis(list_logp, list_target[:, None], axis=-1)[:, 0]
    point_loss, list_loss = point_ce.mean(), list_ce.mean()
    loss = pointwise_weight * point_loss + listwise_weight * list_loss
    metrics = {"pointwise_loss": point_loss, "listwise_loss": list_loss,
               "pointwise_accuracy": jnp.mean(jnp.argmax(pair, axis=-1) == point_target),
               "listwise_accuracy": jnp.mean(jnp.argmax(list_logp, axis=-1) == list_target)}
    return loss, metrics


def merged_embedder_weights(checkpoint) -> dict[str, np.ndarray]:
    """A trained embedder's flat params with its LoRA (if any) folded into the base kernels and dropped."""
    lora = checkpoint.model_config.text.lora
    base, factors = lora_lib.split_flat(checkpoint.flat)
    if not factors or lora is None:
        return base
    return lora_lib.merge(checkpoint.flat, lora)


class RerankTask(UniversalTask):
    """What the trainer needs for the joint reranker; see the module docstring and `idmr_jax.train.trainer.Task`."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        if not embedder.uses_lora(config.model):
            raise ValueError("the reranker trains its own LoRA on the LM: set config.model.lora.rank > 0")
        if self.data_format != "pairs":
            raise ValueError(f"config.data.format = {self.data_format!r}: the reranker trains on pairs")

    @functools.cached_property
    def answers(self) -> AnswerIds:
        """The answer token ids ("Yes", "No", "1".."k") under the config's tokenizer and prompt set."""
        from idmr_jax.tasks.rerank.pipeline import layout_of, tokenizers_of

        tokenizer = tokenizers_of(self, layout_of(self))["pointwise"]
        return answer_ids(tokenizer, load_rerank_prompts(self.config.rerank.prompt_set), int(self.config.rerank.k))

    def load_pretrained(self, state, mesh):
        """``model.init.format = "workdir"``: an embedder's latest checkpoint, its LoRA merged into the base (the
        reranker's own adapters keep their initialisation); any other format as `UniversalTask` loads it."""
        init = self.config.model.init
        if init.format != "workdir":
            return super().load_pretrained(state, mesh)
        if not init.path:
            raise ValueError("config.model.init.format is 'workdir' but config.model.init.path is empty: give the "
                             "embedder's training workdir")
        from idmr_jax.train.state import write_into_state
        from idmr_jax.weights.workdir import restore

        checkpoint = restore(init.path)
        state, loaded = write_into_state(state, merged_embedder_weights(checkpoint), source=str(checkpoint.step_dir))
        print(f"initialised {len(loaded)} tensors from {checkpoint.step_dir}")
        return state

    def last_logits(self, model, batch: dict, prefix: str, *, deterministic: bool) -> jax.Array:
        """[rows, V] logits at the last position of each ``{prefix}`` prompt (rows flattened)."""
        ids = batch[f"{prefix}_ids"]
        length = ids.shape[-1]
        pixels = valid = None
        if f"{prefix}_pixels" in batch:
            px = batch[f"{prefix}_pixels"]
            pixels = px.reshape(-1, *px.shape[-3:])
            valid = batch[f"{prefix}_image_valid"].reshape(-1)
        return last_logits(model, ids.reshape(-1, length), batch[f"{prefix}_mask"].reshape(-1, length), pixels,
                           valid, deterministic=deterministic)

    def loss_fn(self, model, batch: dict, rng: jax.Array, *, mesh) -> tuple[jax.Array, dict]:
        """The joint loss (module docstring); the LoRA dropout is seeded by `rng` (none when `rng` is None)."""
        del mesh  # the batch is sharded on its rows; every prompt's logits stay on its device
        if rng is not None:
            from flax import nnx

            nnx.reseed(model, dropout=rng, policy="match_shape")
        point = self.last_logits(model, batch, "point", deterministic=rng is None)
        listed = self.last_logits(model, batch, "list", deterministic=rng is None)
        lc = self.config.loss
        return joint_loss(point, batch["point_label"].reshape(-1), listed, batch["list_target"], batch["list_size"],
                          self.answers, pointwise_weight=float(lc.pointwise_weight),
                          listwise_weight=float(lc.listwise_weight))

    def train_iterator(self):
        from idmr_jax.tasks.rerank import pipeline

        if self.config.data.source != "arrayrecord":
            raise ValueError(f"config.data.source = {self.config.data.source!r}: the reranker reads training pairs "
                             "(arrayrecord)")
        return pipeline.train_iterator(self)

    def evaluate(self, model, workdir: epath.Path, step: int) -> dict:
        """The reranker on its retriever's top K of the val split (`idmr_jax.tasks.rerank.evaluate`)."""
        del step
        from idmr_jax.tasks.rerank.evaluate import evaluate_reranker

        return evaluate_reranker(self, model, workdir)


def family_task(config: ml_collections.ConfigDict) -> str:
    """The IDMR embedder's family (precision parts and weight formats are registered under "idmr")."""
    return universal_family(config)


model_config = embedder.model_config
# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = RerankTask
MODEL_KIND = "llava"
model_kind = universal_model_kind
