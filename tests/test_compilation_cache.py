"""The persistent compilation cache of `idmr_jax.main` (`idmr_jax.runtime.enable_compilation_cache`): where it
goes, that a second process reads what the first compiled, that it can be turned off, and that a new seed compiles
nothing that another seed compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from jax_env import subprocess_env

from configs import oacir
from idmr_jax import runtime, tasks
from idmr_jax.train.setup import setup_state

ROOT = Path(__file__).resolve().parents[1]

# Enables the cache as idmr_jax.main does, compiles one small program and reports the cache hits JAX counted.
_PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from idmr_jax import runtime
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
folder = runtime.enable_compilation_cache(sys.argv[1] if len(sys.argv) > 1 else None)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # JAX keeps only slow compiles by default
y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((8, 8)))
print(json.dumps({"folder": folder, "hits": len(hits), "value": float(y),
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def _run(tmp_path, *args):
    env = subprocess_env(1, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test run's own cache would win
    proc = subprocess.run([sys.executable, "-c", _PROGRAM, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    expected = tmp_path / "xdg" / "idmr_jax" / "xla" / runtime.host_cache_subdir()
    assert first["folder"] == second["folder"] == str(expected)
    assert first["hits"] == 0 and second["hits"] >= 1 and first["value"] == second["value"]
    assert any(expected.iterdir()) and first["max_size"] == runtime.COMPILATION_CACHE_MAX_BYTES
    off = _run(tmp_path / "off", "")
    assert off["folder"] is None and off["hits"] == 0 and not (tmp_path / "off" / "xdg").exists()


def test_the_folder_follows_the_environment_then_the_flag():
    host = runtime.host_cache_subdir()
    assert runtime.compilation_cache_folder(None, {"XDG_CACHE_HOME": "/c"}) == f"/c/idmr_jax/xla/{host}"
    assert runtime.compilation_cache_folder("gs://b/xla", {}) == f"gs://b/xla/{host}"
    assert runtime.compilation_cache_folder("~/x", {}) == os.path.join(os.path.expanduser("~/x"), host)
    assert runtime.compilation_cache_folder("", {}) is None
    env = {"JAX_COMPILATION_CACHE_DIR": "/jax", "XDG_CACHE_HOME": "/c"}
    assert runtime.compilation_cache_folder(None, env) == runtime.compilation_cache_folder("", env) == "/jax"


def test_one_folder_per_cpu_model_and_instruction_set(tmp_path):
    def cpuinfo(name, model, flags, cores=2):
        path = tmp_path / name
        core = "processor\t: {i}\nmodel name\t: {model}\nflags\t\t: {flags}\ncpu MHz\t\t: {mhz}\n\n"
        path.write_text("".join(core.format(i=i, model=model, flags=flags, mhz=1000 + i) for i in range(cores)))
        return str(path)

    base = runtime.host_cache_subdir(cpuinfo("a", "Xeon", "fpu avx2 avx512f amx_tile"))
    assert base.startswith("host-") and len(base) == len("host-") + 12
    assert runtime.host_cache_subdir(cpuinfo("b", "Xeon", "fpu avx2 avx512f amx_tile", cores=8)) == base
    assert runtime.host_cache_subdir(cpuinfo("c", "Xeon", "fpu avx2 avx512f")) != base
    assert runtime.host_cache_subdir(cpuinfo("d", "EPYC", "fpu avx2 avx512f amx_tile")) != base


def test_a_new_seed_reads_the_programs_of_another_seed():
    # The seed enters the sharded init as data (train/state.py), so a run at a new seed compiles nothing that a run
    # at another seed compiled: every program of its setup comes from the run's cache (tests/conftest.py).
    events = {"on": False, "requests": 0, "hits": 0}

    def count(event, **_):
        if events["on"] and event.startswith("/jax/compilation_cache/"):
            key = {"compile_requests_use_cache": "requests", "cache_hits": "hits"}.get(event.rsplit("/", 1)[1])
            if key:
                events[key] += 1

    jax.monitoring.register_event_listener(count)
    states = {}
    for seed in (0, 1):
        config = oacir.get_config("tiny")
        config.seed = seed
        events["on"] = seed == 1
        states[seed] = setup_state(tasks.build(config), total_steps=2).state
    events["on"] = False
    assert events["requests"] >= 1 and events["hits"] == events["requests"], events
    for seed, state in states.items():
        np.testing.assert_array_equal(np.asarray(state.rng), np.asarray(jax.random.key_data(jax.random.key(seed))))
    a, b = (jax.tree.leaves(states[s].params) for s in (0, 1))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
