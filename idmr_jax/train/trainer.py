"""The training loop shared by every task (AdaFocal, MLLM embedders): one trainer, many tasks.

    lock   <- WORKDIR/.lock (process 0), so a second run in the same workdir stops at once (train/lock.py)
    state  <- restore latest checkpoint (params, optimiser, step, RNG + data iterator) or sharded init; the saved
              config must match (train/resume.py), corrupt checkpoints are moved aside (train/integrity.py)
    loop:     batch -> global arrays on the mesh -> jitted step (state donated) -> metrics / checkpoints
    end:      final checkpoint, then the task's evaluation

Determinism: the step's RNG is fold_in(base_rng, step) and the data iterator's state is saved with the model,
so a killed-and-restarted run replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from idmr_jax import runtime
from idmr_jax import sharding as shd
from idmr_jax.train import checkpoint as ckpt_lib
from idmr_jax.train import resume
from idmr_jax.train import workdir as layout
from idmr_jax.train.lock import WorkdirLock
from idmr_jax.train.metric_writer import MetricWriter
from idmr_jax.train.setup import setup_state
from idmr_jax.train.state import RANDOM_INIT, batch_shardings, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; training stops instead of writing a corrupted checkpoint."""


class Task(Protocol):
    """What the trainer needs from a model family (see idmr_jax/tasks/)."""

    config: ml_collections.ConfigDict
    frozen_patterns: tuple[str, ...]

    def build_model(self, seed=None) -> nnx.Module:
        """The model initialised from `seed`: ``config.seed`` when None, else an int or a traced scalar (the
        sharded init passes the seed as data, so one compiled init serves every seed; see ``init_keys``)."""
    def load_pretrained(self, state, mesh) -> Any:
        """`state` with the initial weights written in; `state` itself (the same object) when it loads none."""

    def bind_mesh(self, mesh) -> Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]: ...
    # Optional: ``prepare_training(model)``, called once before the first step with the weights the run trains from
    # (loaded or restored), e.g. to compute inputs that depend only on frozen weights (OACIR's token cache).
    def train_iterator(self) -> Any: ...
    def evaluate(self, model: nnx.Module, workdir: epath.Path, step: int) -> dict: ...


# Batch entries that identify examples (for tests and debugging) but are not model inputs.
NON_MODEL_KEYS = ("example_id",)


def model_inputs(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in local.items() if k not in NON_MODEL_KEYS}


def global_batch(local: dict[str, np.ndarray], shardings: dict) -> dict[str, jax.Array]:
    """Assembles each process's share of the batch into global arrays on the mesh."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int | None) -> int:
    if config.train.get("num_steps"):
        return int(config.train.num_steps)
    if not steps_per_epoch:
        raise ValueError("set config.train.num_steps, or use a data source that knows its epoch length")
    return int(config.train.num_epochs * steps_per_epoch)


def train_and_evaluate(task: Task, workdir: str | epath.Path) -> dict:
    """Trains `task` in `workdir` (resuming if it holds checkpoints) and returns the final eval metrics.

    Holds the workdir's lock for the whole run (process 0 only; released on exceptions too).
    """
    workdir = layout.root(workdir)  # local ones made absolute (Orbax needs that)
    workdir.mkdir(parents=True, exist_ok=True)
    resume_mode = task.config.train.get("resume", "check")
    if resume_mode not in resume.RESUME_MODES:
        raise ValueError(f"config.train.resume={resume_mode!r}; use one of {resume.RESUME_MODES}")
    with WorkdirLock(workdir, enabled=jax.process_index() == 0):
        runtime.barrier("workdir_locked")
        return _train_and_evaluate(task, workdir)


def _train_and_evaluate(task: Task, workdir: epath.Path) -> dict:
    config = task.config
    config_json = ckpt_lib.config_to_json(config)
    resume_mode = config.train.get("resume", "check")
    # At once, before the slow set-up: a changed config, or resume=fresh over finished checkpoints.
    resume.check_latest_config(workdir, config_json)
    resume.check_fresh_start(workdir, resume_mode, before_restore=True)
    mesh = shd.mesh_from_config(config)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    data_iter = task.train_iterator()
    total_steps = total_train_steps(config, getattr(data_iter, "steps_per_epoch", None))
    setup = setup_state(task, total_steps=total_steps, mesh=mesh)
    rules, graphdef, state = setup.rules, setup.graphdef, setup.state

    with shd.axis_rules(mesh, rules):
        checkpointer = ckpt_lib.Checkpointer(workdir, max_to_keep=config.train.get("keep_checkpoints", 3),
                                             async_save=config.train.get("async_checkpoints", True),
                                             verify=config.train.get("verify_checkpoints", True))
        restored = checkpointer.restore_latest(state, data_iter, config_json)
        if restored is not None:
            state, start = restored
            logging.info("resumed from step %d", start)
            print(f"resuming from checkpoint at step {start}")
        else:
            resume.check_fresh_start(workdir, resume_mode, before_restore=False)
            state = task.load_pretrained(state, mesh)
            start = 0
        prepare = getattr(task, "prepare_training", None)
        if prepare is not None:  # e.g. the frozen-encoder token pass; the model's arrays are not kept (donated below)
            prepare(nnx.merge(graphdef, state.params, state.frozen))

        batch_sh = None
        train_step = None
        writer = MetricWriter(workdir, total_steps, initial_step=start, progress=config.train.get("progress", True))
        log_every = int(config.train.log_every)
        ckpt_every = int(config.train.checkpoint_every)
        pending = None  # (step, metrics) of the previous step: checked after the next one is dispatched
        window_start, window_steps = time.perf_counter(), 0
        global_bs = int(config.data.batch_size)

        def check(step_no: int, metrics: dict):
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss} at step {step_no}; stopping (last good checkpoint kept)")

        for step_no in range(start, total_steps):
            local = model_inputs(next(data_iter))
            if train_step is None:
                batch_sh = batch_shardings(mesh, rules, local)
                step_fn = make_train_step(graphdef, task.bind_mesh(mesh), setup.optimizer, setup.schedules,
                                          setup.state_shardings, batch_sh)
                batch = global_batch(local, batch_sh)
                # Compiled ahead of the first step, which every process then starts together (runtime.barrier).
                train_step = step_fn.lower(state, batch).compile()
                runtime.barrier("train_step_compiled")
            else:
                batch = global_batch(local, batch_sh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                check(*pending)
            pending = (step_no, metrics)
            window_steps += 1
            done = step_no + 1
            if done % log_every == 0 or done == total_steps:
                check(*pending)
                jax.block_until_ready(metrics["loss"])
                dt = time.perf_counter() - window_start
                timing = {"step_time_s": dt / window_steps, "examples_per_s": global_bs * window_steps / dt}
                writer.write(done, {**metrics, **timing})
                window_start, window_steps = time.perf_counter(), 0
            writer.advance(done)
            if done % ckpt_every == 0 or done == total_steps:
                checkpointer.save(done, state, data_iter, config_json)
        if pending is not None:
            check(*pending)
        checkpointer.wait()

        results = {}
        if config.get("eval") and config.eval.get("at_end", True):
            model = nnx.merge(graphdef, state.params, state.frozen)
            results = task.evaluate(model, workdir, total_steps)
            writer.write(total_steps, {k.replace("/", "_"): v for k, v in results.items()}, prefix="eval")
        writer.close()
        checkpointer.close()
        if hasattr(data_iter, "close"):
            data_iter.close()  # stops Grain worker processes
    return results


def check_eval_writable(workdir: epath.Path) -> None:
    """Fails unless ``WORKDIR/eval/`` can be written (process 0 writes the results): checked before evaluating,
    so a read-only workdir does not cost an evaluation whose results are then lost."""
    if jax.process_index() != 0:
        return
    probe = workdir / layout.EVAL_DIR / ".write-test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{probe.parent} is not writable ({type(e).__name__}: {e}); evaluation would lose "
                              "its results: evaluate a writable copy of the workdir") from e


def evaluate_only(task: Task, workdir: str | epath.Path) -> dict:
    """Restores the latest intact checkpoint in `workdir` and evaluates it.

    Without a checkpoint it evaluates the task's initial weights (``config.model.init``, packaged weights), and
    refuses when there are none, unless ``config.model.init.format`` is ``"random"`` (`state.RANDOM_INIT`): metrics
    of random weights are only reported when asked for by name. Fails before evaluating if
    ``WORKDIR/eval/`` is not writable.
    """
    workdir = layout.root(workdir)  # local ones made absolute (Orbax needs that)
    config = task.config
    # The optimiser state is only a restore target here: its schedule length does not matter.
    setup = setup_state(task, total_steps=1)
    mesh, graphdef, state = setup.mesh, setup.graphdef, setup.state
    with shd.axis_rules(mesh, setup.rules):
        step = 0
        if layout.finished_steps(workdir):
            # Corrupt checkpoints are skipped, not moved: the workdir may be read-only or in use by training.
            checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False, move_corrupt=False,
                                                 verify=config.train.get("verify_checkpoints", True))
            restored = checkpointer.restore_latest(state, None)
            checkpointer.close()
            if restored is None:
                raise FileNotFoundError(f"{workdir}: none of its checkpoints is readable; nothing to evaluate")
            state, step = restored
        else:
            initial = task.load_pretrained(state, mesh)
            if initial is state and config.model.init.format != RANDOM_INIT:  # nothing loaded, none asked for
                raise FileNotFoundError(
                    f"{workdir}: no finished checkpoint to evaluate, and config.model.init names no weights: that "
                    "would evaluate randomly initialised weights. Train first (--config.mode=train), point "
                    "--workdir at a training workdir, or name initial weights with --config.model.init.format=... "
                    "--config.model.init.path=...")
            state = initial
        check_eval_writable(workdir)
        model = nnx.merge(graphdef, state.params, state.frozen)
        results = task.evaluate(model, workdir, step)
    return results
