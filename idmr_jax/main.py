"""Entry point: ``python -m idmr_jax.main --config=configs/<name>.py[:arg] --workdir=DIR``.

The config file's ``get_config(arg)`` builds an ml_collections ConfigDict; any field can be overridden on the
command line, e.g. ``--config.train.num_steps=100 --config.data.batch_size=64``. ``config.mode`` selects
``train`` (train, then evaluate) or ``eval`` (evaluate the latest checkpoint in the workdir).

Multi-process: the same command runs on every host (one process per host). TPU VMs and Slurm are detected by
JAX itself; elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, which the flags override).

Compiled programs are kept in a persistent cache (``~/.cache/idmr_jax/xla``; ``--compilation_cache_dir``), so the
second run of a config (another seed, an evaluation) skips most of its compile time.

Logging: warnings and errors only by default (JAX, Orbax, Grain and absl INFO lines would bury the progress bar);
``--log_level=info`` (or ``--verbose``) shows them, ``--log_level=debug`` more.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/oacir.py:demo", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, logs and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0's JAX coordinator (overrides JAX_COORDINATOR_ADDRESS); "
    "not needed on TPU VMs or under Slurm.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of JAX processes (overrides JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..N-1 (overrides JAX_PROCESS_ID).")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "warning", ["debug", "info", "warning", "error"],
                               "Lowest level of the log lines shown (absl, JAX, Orbax, Grain and idmr_jax).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Shorthand for --log_level=info.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Persistent XLA compilation cache (local or gs://), so that a second run of the "
    "same programs does not compile them again; default ~/.cache/idmr_jax/xla, '' turns it off, "
    "JAX_COMPILATION_CACHE_DIR overrides it.")
flags.mark_flags_as_required(["config", "workdir"])


def log_level() -> str:
    """The level chosen on the command line: ``--log_level``, or "info" for ``--verbose`` (the lower of the two)."""
    levels = ["debug", "info", "warning", "error"]
    return min(_LOG_LEVEL.value, "info" if _VERBOSE.value else "error", key=levels.index)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(log_level())  # before JAX starts: its backend set-up logs at INFO
    config = _CONFIG.value

    from idmr_jax import runtime  # imported after flag parsing: it initialises JAX (multi-host aware)

    runtime.enable_compilation_cache(_CACHE_DIR.value)
    runtime.initialize(config, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                       process_id=_PROCESS_ID.value)
    from idmr_jax import tasks
    from idmr_jax.config_checks import check_config
    from idmr_jax.train import trainer

    def run(config, workdir: str) -> dict:
        check_config(config)  # a batch size or mesh the devices cannot run fails here, before data or model exist
        config = tasks.prepare_data(config)  # the demo's data is built (or reused) here, before the task
        task = tasks.build(config)
        logging.info("task %s, mode %s, workdir %s", config.task, config.mode, workdir)
        if config.mode == "train":
            return trainer.train_and_evaluate(task, workdir)
        if config.mode == "eval":
            return trainer.evaluate_only(task, workdir)
        raise ValueError(f"unknown config.mode {config.mode!r}; use train or eval")

    if config.get("loop"):  # train, index, mine, retrain, rerank (idmr_jax/tasks/rerank/loop.py)
        from idmr_jax.tasks.rerank import loop

        results = loop.run_loop(config, _WORKDIR.value, run)
    elif config.get("stages"):  # a recipe in stages (idmr_jax/train/stages.py), e.g. configs/instructcir.py:demo
        from idmr_jax.train import stages

        results = stages.run_stages(config, _WORKDIR.value, run)
    else:
        results = run(config, _WORKDIR.value)
    if results:
        tasks.print_results(config, results)


if __name__ == "__main__":
    app.run(main)
