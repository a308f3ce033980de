"""End-to-end training of a tiny AdaFocal on 8 fake devices: learning, outputs, NaN stop, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/oacir.py:tiny"


def _main(workdir, *flags, timeout=600, check=True):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "idmr_jax.main", f"--config={TINY}", f"--workdir={workdir}",
           "--config.train.progress=False", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _train_records(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _final_params(workdir, step):
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


@pytest.mark.slow
def test_tiny_adafocal_trains_and_writes_metrics(tmp_path):
    _main(tmp_path, "--config.train.num_steps=20", "--config.train.log_every=1")
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 21))
    losses = np.array([r["loss"] for r in records])
    assert np.all(np.isfinite(losses))
    # The fake pool is memorised: the last steps' loss is clearly below the first steps'.
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses
    for key in ("temperature", "beta_mean", "beta_std", "grad_norm", "lr/all", "examples_per_s", "step_time_s"):
        assert key in records[-1], key
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"fake/R@1", "fake/R@5", "fake/R@10", "fake/R@50", "fake/R_ID@1", "fake/R_ID@5", "avg"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["avg"] == pytest.approx(np.mean([metrics["fake/R_ID@1"], metrics["fake/R@1"], metrics["fake/R@5"]]))
    rankings = (tmp_path / "eval" / "rankings.jsonl").read_text().splitlines()
    assert len(rankings) == 64 and len(json.loads(rankings[0])["ranking"]) == 50
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step(tmp_path):
    # A huge learning rate on a zero temperature floor drives the loss to inf/NaN within a few steps.
    proc = _main(tmp_path, "--config.train.num_steps=30", "--config.model.temp_init=0.0", check=False)
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr and "at step" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    flags = ["--config.train.num_steps=12", "--config.train.checkpoint_every=3", "--config.eval.at_end=False"]
    _main(tmp_path / "straight", *flags)

    killed = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "idmr_jax.main", f"--config={TINY}", f"--workdir={killed}",
           "--config.train.progress=False", *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Kill as soon as a mid-run checkpoint is final, i.e. while training is still going.
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "6").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "12").exists()

    resumed = _main(killed, *flags)
    assert "resuming from checkpoint at step" in resumed.stdout
    a, b = _final_params(tmp_path / "straight", 12), _final_params(killed, 12)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)

    # An unreadable latest checkpoint: the run says so and falls back to the previous one.
    for f in (killed / "checkpoints" / "12" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"corrupted")
    proc = _main(killed, *flags[:-1], "--config.mode=eval")
    assert "checkpoint 12 is unreadable" in proc.stdout and "falling back" in proc.stdout, proc.stdout[-2000:]
    assert (killed / "eval" / "metrics.json").exists()
