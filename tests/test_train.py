"""End-to-end training of a tiny AdaFocal on 8 fake devices: learning, outputs, NaN stop, kill-and-resume.

One uninterrupted 20-step run through ``python -m idmr_jax.main`` (checkpoints every 5 steps, metrics every step,
evaluation at the end) is shared by the tests that read it: its outputs are checked, and it is the reference that a
killed and resumed run must match. The kill needs a process of its own; the resume, the evaluation and the NaN
stop run the same trainer in this process, reading the compiled programs back from the run's compilation cache
(tests/conftest.py).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jax_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/oacir.py:tiny"
# Settings of every run here; the killed run (and its resume) skip the evaluation at the end.
RUN = {"train.progress": False, "train.num_steps": 20, "train.checkpoint_every": 5, "train.log_every": 1}
NO_EVAL = {"eval.at_end": False}


def _flags(settings: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in settings.items()]


def _main_cmd(workdir, settings: dict) -> list[str]:
    # The config by absolute path, so that a run may start in another folder (with a relative --workdir).
    return [sys.executable, "-m", "idmr_jax.main", f"--config={ROOT / TINY}", f"--workdir={workdir}",
            *_flags(settings)]


def _env() -> dict:
    return subprocess_env(devices=8)


def _task(settings: dict):
    """The task `python -m idmr_jax.main --config=configs/oacir.py:tiny` builds with `settings` as its overrides."""
    from configs import oacir
    from idmr_jax import tasks
    from idmr_jax.config_checks import check_config

    config = oacir.get_config("tiny")
    for dotted, value in settings.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    check_config(config)
    return tasks.build(tasks.prepare_data(config))


def _train_records(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _final_params(workdir, step):
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The workdir of the uninterrupted 20-step run (with its evaluation), through the command line."""
    workdir = tmp_path_factory.mktemp("straight")
    proc = subprocess.run(_main_cmd(workdir, RUN), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return workdir


@pytest.mark.slow
def test_tiny_adafocal_trains_and_writes_metrics(straight):
    records = _train_records(straight)
    assert [r["step"] for r in records] == list(range(1, 21))
    losses = np.array([r["loss"] for r in records])
    assert np.all(np.isfinite(losses))
    # The fake pool is memorised: the last steps' loss is clearly below the first steps'.
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    for key in ("temperature", "beta_mean", "beta_std", "grad_norm", "lr/all", "examples_per_s", "step_time_s"):
        assert key in records[-1], key
    metrics = json.loads((straight / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"fake/R@1", "fake/R@5", "fake/R@10", "fake/R@50", "fake/R_ID@1", "fake/R_ID@5", "avg"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["avg"] == pytest.approx(np.mean([metrics["fake/R_ID@1"], metrics["fake/R@1"], metrics["fake/R@5"]]))
    rankings = (straight / "eval" / "rankings.jsonl").read_text().splitlines()
    assert len(rankings) == 64 and len(json.loads(rankings[0])["ranking"]) == 50
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step(tmp_path):
    # A zero temperature makes every logit infinite, so the loss is NaN from the first step on. It is set in the
    # initial weights (the task's load_pretrained hook) rather than by --config.model.temp_init=0: the programs
    # then stay those of the shared run, read back from the compilation cache.
    import jax

    from idmr_jax.train import trainer
    from idmr_jax.train import workdir as layout

    task = _task({**RUN, **NO_EVAL})
    load_pretrained = task.load_pretrained

    def zero_temperature(state, mesh):
        state = load_pretrained(state, mesh)
        zeroed = []

        def zero(path, x):
            if jax.tree_util.keystr(path) == "['blip2']['temp'].value":
                zeroed.append(path)
                return x * 0  # keeps the array's sharding
            return x

        params = jax.tree_util.tree_map_with_path(zero, state.params)
        assert len(zeroed) == 1, "the temperature param was not found"
        return state.replace(params=params)

    task.load_pretrained = zero_temperature
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step 0;"):
        trainer.train_and_evaluate(task, tmp_path)
    assert layout.finished_steps(tmp_path) == []  # stopped at the first step, before any checkpoint


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(straight, tmp_path, capsys, monkeypatch):
    from idmr_jax.train import trainer

    killed = tmp_path / "killed"
    # Started in tmp_path with a relative --workdir, as people type it (Orbax itself needs absolute paths).
    proc = subprocess.Popen(_main_cmd("killed", {**RUN, **NO_EVAL}), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    # Kill as soon as a mid-run checkpoint is final, i.e. while training is still going.
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "10").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "20").exists()

    # The same config resumed in this process (what the command line would build: the saved config must match),
    # through a relative path too.
    monkeypatch.chdir(tmp_path)
    trainer.train_and_evaluate(_task({**RUN, **NO_EVAL}), "killed")
    assert "resuming from checkpoint at step" in capsys.readouterr().out
    a, b = _final_params(straight, 20), _final_params(killed, 20)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)

    # An unreadable latest checkpoint: the evaluation says so and falls back to the previous one.
    for f in (killed / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupted")
    trainer.evaluate_only(_task({**RUN, "mode": "eval"}), killed)
    out = capsys.readouterr().out
    assert "checkpoint 20 is unreadable" in out and "falling back" in out, out[-2000:]
    assert (killed / "eval" / "metrics.json").exists()
