"""The IDMR task (and its LamRA / InstructCIR variants): the universal task configured for IDMR's triplets.

    query     = LlavaEmbedder(crop image + instruction with the caption)      -> [B, D], L2-normalised
    candidate = LlavaEmbedder(full image + "Represent the given image.")     -> [B, D]
    loss      = InfoNCE(query -> candidates of the whole global batch (+ hard-negative columns)) / temperature

The model, the loss (GradCache included) and the weights are the universal task's
(`idmr_jax.tasks.universal.task`); what this class fixes is the data (``data.format = "triplets"``: crop + caption
-> full image, `idmr_jax.tasks.idmr.pipeline`) and the evaluation (``eval.benchmark = "idmr"``: instance retrieval
R@K / R_ID@K, `idmr_jax.tasks.idmr.evaluate`) of a config that names neither.
"""

from __future__ import annotations

from idmr_jax.tasks.universal import model as embedder
from idmr_jax.tasks.universal import task as universal


class IdmrTask(universal.UniversalTask):
    """The universal task on IDMR triplets, evaluated on instance retrieval; see the module docstring."""

    default_data_format = "triplets"
    default_benchmark = "idmr"


model_config = embedder.model_config
# The task registry's convention (idmr_jax/tasks/__init__.py).
TASK = IdmrTask
MODEL_KIND = universal.MODEL_KIND
model_kind = universal.model_kind
