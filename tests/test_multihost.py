"""Multi-host training with JAX's own runtime: 2 processes x 1 CPU device train exactly like 1 x 2.

The two-process run goes through the real entry point (``python -m idmr_jax.main --coordinator_address=...``)
with ``jax.distributed`` on localhost: 2 steps, a checkpoint, a clean stop, then a fresh pair of processes
restores it and trains 2 more. Its final parameters must equal those of one process with 2 devices that trains
the 4 steps in one go.

One device per process, as on GPU machines (one process per GPU): under ``jax.distributed`` every CPU device is a
gloo rank, and with more ranks than cores gloo's waiting ranks starve the working ones. Measured on 2 cores, one
process under ``jax.distributed``, the tiny config's step: 1.0 s with 2 devices, 15 s with 4 and 16.5 s with 8
(0.5 s with 8 devices and XLA's in-process collectives). The former 2 x 4 layout spent most of this test's 5
minutes there; splitting a process's batch over its local devices is covered by the single-process tests.

The reference also runs under ``jax.distributed`` (one process), so that its cross-device sums use the same CPU
collectives (gloo) as the pair; with XLA's in-process collectives instead, the summation order differs, and Adam
turns that rounding noise in gradients that are exactly zero in exact arithmetic (attention key biases: softmax
ignores a per-query constant) and tiny ones into steps of the size of the learning rate. Measured after 8 steps with
in-process collectives for the reference (when this test ran 2 x 4 devices): 2 x 4 vs 1 x 8 devices, key biases up
to 2.2e-3 apart and word embeddings 8e-5 (all else within 1.1e-5); 1 x 4 vs 1 x 8 devices, both in one process,
about as much (2.4e-3, 1.9e-4, a few others up to 1.1e-4): a property of the summation order, not of multi-host
training. With gloo on both sides the parameters come out bit-identical.

Every process uses the test run's persistent compilation cache (tests/conftest.py), which changes no numbers, only
the time spent compiling: on CPU only process 0's programs come back from it (JAX keys CPU programs by process
and only process 0 writes), so the restarted process 1 compiles again. For the same reason
``jax_share_binary_between_hosts`` cannot be used on CPU: process 1 would wait for a program under its own key.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jax_env import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/oacir.py:tiny,fake"
# 2 + 2 steps of the tiny config's global batch 16 (8 per device), metrics every step, no evaluation.
FLAGS = ["--config.train.progress=False", "--config.eval.at_end=False", "--config.train.checkpoint_every=2",
         "--config.train.log_every=1", "--log_level=info"]  # info: the "JAX process i/n" lines checked below
TIMEOUT = 900


# The compilation cache's settings pass through; nothing else that tells JAX (or the launch code) about a cluster.
CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def _env(devices: int, cache: Path) -> dict:
    env = subprocess_env(devices, base={k: v for k, v in os.environ.items()
                                        if k in CACHE_VARS or not k.startswith(("JAX_", "SLURM_", "TPU_", "IDMR_"))},
                         HF_HUB_OFFLINE="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache))  # run on its own, without tests/conftest.py
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir: Path, logs: Path, name: str, env: dict, *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "idmr_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *FLAGS, *flags]
    with open(logs / f"{name}.out", "w") as out, open(logs / f"{name}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)


def _wait_all(procs: dict[str, subprocess.Popen], logs: Path) -> dict[str, tuple[str, str]]:
    """Waits for every process; on any failure kills the rest and shows the logs. Returns {name: (out, err)}."""
    deadline = time.monotonic() + TIMEOUT
    try:
        # A failed process leaves its peers waiting on it: stop waiting as soon as one fails.
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.5)
        codes = {name: p.poll() for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = {name: ((logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text()) for name in procs}
    bad = {n: c for n, c in codes.items() if c != 0}
    assert not bad, "\n".join(f"--- {n} {'was killed' if c is None else f'exited {c}'}\n{texts[n][0][-2000:]}\n"
                              f"{texts[n][1][-5000:]}" for n, c in bad.items())
    return texts


def _two_processes(workdir: Path, logs: Path, name: str, cache: Path, *flags: str) -> dict[str, subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    return {f"{name}-p{i}": _launch(workdir, logs, f"{name}-p{i}", _env(1, cache), f"--coordinator_address={address}",
                                    "--num_processes=2", f"--process_id={i}", *flags) for i in range(2)}


def _final_params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    # Restored as host arrays: the checkpoint's own shardings name devices of the run that wrote it.
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree["params"])}


def _train_records(workdir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _devices_line(stderr: str) -> str:
    found = re.findall(r"JAX process \d+/\d+, \d+ local / \d+ global devices \(\w+\)", stderr)
    assert len(found) == 1, stderr[-3000:]
    return found[0]


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("oacir_config", ROOT / "configs" / "oacir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny,fake")
    # A 2-step run resumed to 4 steps optimises exactly like one 4-step run only with a step-count-free schedule.
    assert config.optim.schedule == "constant" and config.data.batch_size == 16 and config.data.source == "fake"

    cache, logs = tmp_path / "jax_cache", tmp_path / "logs"
    start = time.perf_counter()
    logs.mkdir()
    single, multi = tmp_path / "single", tmp_path / "multi"

    first = _wait_all(_two_processes(multi, logs, "first", cache, "--config.train.num_steps=2"), logs)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["2"]
    # Reference: one process, 2 devices, 4 steps in one go. It runs alongside the restarted pair, whose process 0
    # reads its programs from the cache while process 1 compiles: two busy processes for two cores.
    procs = {"single": _launch(single, logs, "single", _env(2, cache),
                               f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=1",
                               "--process_id=0", "--config.train.num_steps=4")}
    procs.update(_two_processes(multi, logs, "second", cache, "--config.train.num_steps=4"))
    second = ref = _wait_all(procs, logs)

    # It really was 2 processes with 1 device each (and 1 x 2 for the reference).
    assert _devices_line(ref["single"][1]) == "JAX process 0/1, 2 local / 2 global devices (cpu)"
    for name, run in (("first", first), ("second", second)):
        for i in range(2):
            assert _devices_line(run[f"{name}-p{i}"][1]) == f"JAX process {i}/2, 1 local / 2 global devices (cpu)"
    for i in range(2):
        assert "resuming from checkpoint at step 2" in second[f"second-p{i}"][0]
    # Each process saved its own data-iterator state next to the shared train state.
    data_dir = multi / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data_dir.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert [json.loads((data_dir / f"process_{i}-of-2.json").read_text()) for i in range(2)] == [{"position": 32}] * 2

    # Only process 0 logs: each logged step appears once, and the losses follow the reference's.
    multi_rows, single_rows = _train_records(multi), _train_records(single)
    assert [r["step"] for r in multi_rows] == [1, 2, 3, 4] == [r["step"] for r in single_rows]
    np.testing.assert_allclose([r["loss"] for r in multi_rows], [r["loss"] for r in single_rows], rtol=1e-5)

    a, b, mid = _final_params(single, 4), _final_params(multi, 4), _final_params(single, 2)
    assert a.keys() == b.keys() and len(a) > 10
    diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    moved = max(float(np.max(np.abs(a[k] - mid[k]))) for k in a)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"max abs param difference 2x1 vs 1x2: {diff:.3g} (params moved up to {moved:.3g} in steps 3-4); "
          f"{time.perf_counter() - start:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s CPU in the runs")
    assert moved > 1e-3  # the last 2 steps changed the params, so equality at step 4 says something
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_data_state_from_another_process_count_is_an_error(tmp_path):
    from idmr_jax.train import checkpoint

    (tmp_path / "process_0-of-2.json").write_text('{"position": 64}')
    (tmp_path / "process_1-of-2.json").write_text('{"position": 64}')
    with pytest.raises(checkpoint.DataStateMismatchError, match=r"process_0-of-1\.json does not exist") as err:
        checkpoint.DataStateHandler().restore(tmp_path)
    assert "process_1-of-2.json" in str(err.value) and "same process count" in str(err.value)
    (tmp_path / "process_0-of-1.json").write_text('{"position": 32}')
    assert checkpoint.DataStateHandler().restore(tmp_path) == {"position": 32}
