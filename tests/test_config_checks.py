"""Config checks against the devices (8 fake CPU devices here): bad batch sizes and meshes fail before any build."""

import sys

import pytest
from absl import flags

from configs import idmr, oacir
from idmr_jax import tasks
from idmr_jax.config_checks import batch_axes, check_config


def oacir_config(batch_size=16, **mesh):
    c = oacir.get_config("tiny,fake")
    c.data.batch_size = batch_size
    c.sharding.mesh.update(mesh)
    return c


@pytest.mark.parametrize("batch", [0, -4])
def test_batch_size_must_be_positive(batch):
    with pytest.raises(ValueError, match=rf"config\.data\.batch_size = {batch}: .*positive"):
        check_config(oacir_config(batch))


def test_batch_size_must_divide_over_the_batch_axes():
    config = oacir_config(6, data=2, fsdp=4)
    assert batch_axes(config) == ("data", "fsdp")
    with pytest.raises(ValueError) as err:
        check_config(config)
    message = str(err.value)
    for part in ("config.data.batch_size = 6", "data=2, fsdp=4", "8 devices on the batch axes",
                 "use a multiple of 8"):
        assert part in message, message
    check_config(oacir_config(16, data=2, fsdp=4))  # a multiple of 8 passes
    check_config(oacir_config(16))  # the tiny config's own mesh (data=-1) and batch


def test_batch_size_must_divide_over_the_processes():
    # Model parallel over 8 devices of two processes: the batch is replicated, but each process feeds half of it.
    config = oacir_config(3, data=1, fsdp=1, model=-1)
    check_config(config, process_count=1)
    with pytest.raises(ValueError, match=r"config\.data\.batch_size = 3 .*2 processes: use a multiple of 2"):
        check_config(config, process_count=2)


def test_eval_batch_size_must_be_positive():
    config = oacir_config()
    config.eval.batch_size = 0
    with pytest.raises(ValueError, match=r"config\.eval\.batch_size = 0"):
        check_config(config)
    config.eval.batch_size = 12  # not a multiple of 8: evaluation rounds it up to the mesh size itself
    check_config(config)


def test_eval_mode_ignores_the_training_batch():
    config = oacir_config(6)
    config.mode = "eval"
    check_config(config)


def test_gradcache_chunks_must_divide_the_batch():
    config = idmr.get_config("tiny")
    check_config(config)  # 16 rows, chunks of 1 row per device on 8 devices
    config.data.batch_size, config.loss.gradcache_chunk = 24, 2
    with pytest.raises(ValueError) as err:
        check_config(config)
    message = str(err.value)
    for part in ("config.data.batch_size = 24", "config.loss.gradcache_chunk = 2", "16 rows", "multiple of 16"):
        assert part in message, message
    config.loss.gradcache_chunk = -1
    with pytest.raises(ValueError, match=r"config\.loss\.gradcache_chunk = -1"):
        check_config(config)
    config.loss.gradcache_chunk = 0  # no GradCache: 24 shards over 8 devices
    check_config(config)


@pytest.mark.parametrize("mesh, why", [
    (dict(data=-1, fsdp=3), "product 3 does not divide the 8 devices"),
    (dict(data=2, fsdp=2), "needs 4 devices, have 8"),
    (dict(data=0, fsdp=-1), "must be positive"),
    (dict(data=-1, fsdp=-1), "at most one -1"),
])
def test_mesh_must_cover_the_devices(mesh, why):
    with pytest.raises(ValueError, match=rf"config\.sharding\.mesh on 8 devices: .*{why}"):
        check_config(oacir_config(**mesh))


def test_mesh_axes_must_be_known():
    config = oacir_config()
    config.sharding.mesh = dict(data=-1, fsdp=1, model=1, tensor=1)
    with pytest.raises(ValueError, match=r"config\.sharding\.mesh .*unknown: \['tensor'\]"):
        check_config(config)


class Built(Exception):
    """Raised by the stand-in tasks.build: the run got past the config checks."""


@pytest.fixture
def run_main(monkeypatch, tmp_path):
    """Runs ``idmr_jax.main`` in-process on command-line overrides; returns the stages it reached. The task is
    never built: the stand-in `tasks.build` raises `Built`."""
    from idmr_jax import main as entry

    stages = []

    def prepare_data(config):
        stages.append("prepare_data")
        return config

    def build(config):
        stages.append("build")
        raise Built

    monkeypatch.setattr(tasks, "prepare_data", prepare_data)
    monkeypatch.setattr(tasks, "build", build)

    def run(config_arg, *overrides):
        argv = ["idmr_jax.main", f"--config={config_arg}", f"--workdir={tmp_path}", *overrides]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the --config.* overrides from sys.argv
        try:
            flags.FLAGS(argv)
            entry.main(argv[:1])
        finally:
            flags.FLAGS.unparse_flags()
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)  # config_flags registers each override anew on every parse

    run.stages = stages
    return run


@pytest.mark.parametrize("batch", ["0", "-4", "6"])
def test_main_refuses_a_bad_batch_before_building(run_main, batch):
    with pytest.raises(ValueError, match=rf"config\.data\.batch_size = {batch}\b"):
        run_main("configs/oacir.py:tiny,fake", f"--config.data.batch_size={batch}")
    assert run_main.stages == []  # neither the data nor the task was touched


def test_main_builds_with_a_good_batch(run_main):
    with pytest.raises(Built):
        run_main("configs/idmr.py:tiny", "--config.data.batch_size=16")
    assert run_main.stages == ["prepare_data", "build"]
