"""Entry point: ``python -m idmr_jax.main --config=configs/<name>.py[:arg] --workdir=DIR``.

The config file's ``get_config(arg)`` builds an ml_collections ConfigDict; any field can be overridden on the
command line, e.g. ``--config.train.num_steps=100 --config.data.batch_size=64``. ``config.mode`` selects
``train`` (train, then evaluate) or ``eval`` (evaluate the latest checkpoint in the workdir).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/oacir.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value

    from idmr_jax import runtime  # imported after flag parsing: it initialises JAX (multi-host aware)

    runtime.initialize(config)
    from idmr_jax import tasks
    from idmr_jax.train import trainer

    task = tasks.build(config)
    logging.info("task %s, mode %s, workdir %s", config.task, config.mode, _WORKDIR.value)
    if config.mode == "train":
        results = trainer.train_and_evaluate(task, _WORKDIR.value)
    elif config.mode == "eval":
        results = trainer.evaluate_only(task, _WORKDIR.value)
    else:
        raise ValueError(f"unknown config.mode {config.mode!r}; use train or eval")
    if results:
        tasks.print_results(config, results)


if __name__ == "__main__":
    app.run(main)
