"""Never lose a run: the config check on resume, the workdir lock, corrupt checkpoints moved aside (never deleted),
checksums verified on restore, and evaluation refusing random weights or an unwritable output folder.

In-process runs of the trainer on ``configs/oacir.py:tiny,fake``; one 6-step run (checkpoints 2, 4, 6) is shared
by copying its workdir, and the test run's persistent compilation cache (tests/conftest.py) lets later runs reuse
its compiled programs (and this file reuse those of test_train.py's runs of the same model, when they came first).
"""

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import oacir
from idmr_jax import tasks
from idmr_jax.train import checkpoint, integrity, lock, resume, trainer
from idmr_jax.train import workdir as layout


def _config(**overrides):
    config = oacir.get_config("tiny,fake")
    config.train.progress = False
    config.eval.at_end = False
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return tasks.prepare_data(config)


def _train(workdir, **overrides) -> str:
    """Trains in-process; returns what the run printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            trainer.train_and_evaluate(tasks.build(_config(**overrides)), workdir)
        finally:
            sys.__stdout__.write(out.getvalue())
    return out.getvalue()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(workdir, pid, start_time=0.0):
    layout.lock_file(workdir).write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                                     "start_time": start_time}))


def _largest_state_file(workdir, step):
    files = [p for p in (Path(workdir) / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """(workdir, output) of a 6-step run (checkpoints 2, 4, 6) started over a lock left by a dead process."""
    workdir = tmp_path_factory.mktemp("base")
    _write_lock(workdir, _dead_pid())
    out = _train(workdir, **{"train.num_steps": 6, "train.checkpoint_every": 2})
    return workdir, out


def _copy(base_run, tmp_path):
    shutil.copytree(base_run[0], tmp_path / "w")
    return tmp_path / "w"


def test_dead_lock_is_taken_over_and_the_lock_released(base_run):
    workdir, out = base_run
    assert "taking over the workdir lock" in out
    assert not layout.lock_file(workdir).exists()
    assert layout.finished_steps(workdir) == [2, 4, 6]
    for step in (2, 4, 6):
        step_dir = layout.checkpoints_dir(workdir) / str(step)
        assert (step_dir / layout.CHECKSUMS_FILE).exists()
        assert integrity.verify(step_dir) is None


def test_a_relative_workdir_is_made_absolute_and_locked(tmp_path, monkeypatch):
    """``--workdir=workdir/demo`` as typed: the layout gives absolute paths (Orbax refuses relative ones), the
    lock is taken and released there; remote paths are left as they are."""
    monkeypatch.chdir(tmp_path)
    assert layout.root("runs/a") == layout.root(tmp_path / "runs" / "a")
    assert os.path.isabs(os.fspath(layout.checkpoints_dir("runs/a")))
    assert str(layout.root("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    with lock.WorkdirLock("runs/a") as held:
        assert held.held and (tmp_path / "runs" / "a" / ".lock").exists()
        with pytest.raises(lock.WorkdirLockedError):
            lock.WorkdirLock("runs/a").acquire()
    assert not (tmp_path / "runs" / "a" / ".lock").exists()


def test_live_lock_stops_a_second_run(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    _write_lock(workdir, os.getpid(), start_time=12345.0)
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {os.getpid()} on host '{socket.gethostname()}'"):
        _train(workdir, **{"train.num_steps": 8})
    assert json.loads(layout.lock_file(workdir).read_text())["start_time"] == 12345.0  # not ours to remove


def test_config_change_is_refused_and_keeps_the_checkpoints(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    with pytest.raises(resume.ConfigChangedError) as err:
        _train(workdir, **{"model.qformer.hidden_size": 32, "train.checkpoint_every": 5, "train.num_steps": 15})
    assert "model.qformer.hidden_size: 64 -> 32" in str(err.value)
    assert "train.num_steps" not in str(err.value) and "checkpoint_every" not in str(err.value)  # free to change
    assert "--config.train.resume=ignore_config" in str(err.value)
    assert layout.finished_steps(workdir) == [2, 4, 6]
    assert not layout.lock_file(workdir).exists()  # released on the exception


def test_shape_mismatch_is_an_error_not_corruption(base_run, tmp_path):
    # What --config.train.resume=ignore_config with another hidden size restores into: the saved state with one
    # array of another shape (built from the checkpoint's metadata, so no model has to be compiled).
    import orbax.checkpoint as ocp

    workdir = _copy(base_run, tmp_path)
    meta = ocp.StandardCheckpointer().metadata(Path(workdir) / "checkpoints" / "6" / "state").item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(meta))
    kernel = target["params"]["blip2"]["qformer"]["layers"]["0"]["ffn"]["intermediate"]["kernel"]
    kernel["value"] = jax.ShapeDtypeStruct((32,) + kernel["value"].shape[1:], kernel["value"].dtype)
    checkpointer = checkpoint.Checkpointer(workdir, async_save=False)
    with pytest.raises(checkpoint.StateMismatchError, match=r"(?s)checkpoint 6 .* intact .*intermediate"):
        checkpointer.restore_latest(target, None)
    checkpointer.close()
    assert layout.finished_steps(workdir) == [2, 4, 6]
    assert not layout.corrupt_dir(workdir).exists()


def test_unreadable_latest_is_moved_aside_and_saved_again(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    _largest_state_file(workdir, 6).unlink()
    # Without checksums, the restore error itself must be recognised as corruption.
    out = _train(workdir, **{"train.num_steps": 8, "train.checkpoint_every": 2, "train.verify_checkpoints": False})
    assert "checkpoint 6 is unreadable" in out and "resuming from checkpoint at step 4" in out
    assert [p.name for p in layout.corrupt_dir(workdir).iterdir()] == ["6-unreadable"]
    assert layout.finished_steps(workdir) == [4, 6, 8]


def test_bit_flip_is_detected_by_checksums(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    target = _largest_state_file(workdir, 6)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    out = _train(workdir, **{"train.num_steps": 6, "train.checkpoint_every": 2})
    assert "checksum mismatch" in out and "resuming from checkpoint at step 4" in out
    assert [p.name for p in layout.corrupt_dir(workdir).iterdir()] == ["6-checksum"]
    assert layout.finished_steps(workdir) == [2, 4, 6]
    assert integrity.verify(layout.checkpoints_dir(workdir) / "6") is None


def test_no_fresh_start_after_every_checkpoint_is_corrupt(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    for step in (2, 4, 6):
        (layout.checkpoints_dir(workdir) / str(step) / layout.CHECKSUMS_FILE).write_text('{"state/x": [1, "0"]}')
    with pytest.raises(resume.NoUsableCheckpointError, match="resume=fresh"):
        _train(workdir, **{"train.num_steps": 8})
    assert sorted(p.name for p in layout.corrupt_dir(workdir).iterdir()) == ["2-checksum", "4-checksum", "6-checksum"]


def test_eval_without_checkpoint_or_init_is_refused(tmp_path):
    workdir = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="randomly initialised"):
        trainer.evaluate_only(tasks.build(_config(mode="eval")), workdir)
    assert not workdir.exists()


def test_eval_into_an_unwritable_folder_is_refused_first(base_run, tmp_path):
    workdir = _copy(base_run, tmp_path)
    (workdir / "eval").write_text("a file where the eval/ folder should be")
    with pytest.raises(PermissionError, match="not writable"):
        trainer.evaluate_only(tasks.build(_config(mode="eval")), workdir)
