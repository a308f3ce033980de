"""The universal retrieval task (config name ``universal``): the MLLM embedder of the ``idmr`` task on queries and
candidates of any modality, evaluated on M-BEIR (`idmr_jax.tasks.universal.evaluate`).

This first step shares the IDMR task's model, weights (``config.model.init``: ``hf_llava``, or ``random`` on
purpose for the ``tiny`` smoke model), training data and loss; ``config.eval.benchmark`` picks the evaluation:
"mbeir" (converted M-BEIR shards in ``config.data.val_dir``) or "idmr" (the IDMR task's). Mixed-modality training
batches (issue 16) build on the universal records (`idmr_jax.tasks.universal.records`) next.
"""

from __future__ import annotations

import ml_collections
from etils import epath

from idmr_jax.tasks.idmr import task as idmr_task

BENCHMARKS = ("mbeir", "idmr")


class UniversalTask(idmr_task.IdmrTask):
    """The IDMR task's embedder with the universal evaluation; see the module docstring."""

    def evaluate(self, model, workdir: epath.Path, step: int) -> dict:
        """M-BEIR (``config.eval.benchmark == "mbeir"``) or the IDMR evaluation."""
        benchmark = self.config.eval.get("benchmark", "idmr")
        if benchmark not in BENCHMARKS:
            raise ValueError(f"config.eval.benchmark = {benchmark!r}: use one of {BENCHMARKS}")
        if benchmark == "idmr":
            return super().evaluate(model, workdir, step)
        from idmr_jax.tasks.universal.evaluate import evaluate_mbeir

        return evaluate_mbeir(self, model, workdir)


def family_task(config: ml_collections.ConfigDict) -> str:
    """The task whose model this one builds (``tasks.model_task_name``): the IDMR embedder's."""
    del config
    return "idmr"


model_config = idmr_task.model_config
TASK = UniversalTask
MODEL_KIND = idmr_task.MODEL_KIND
