"""The test processes' XLA flags (tests/jax_env.py): what a JAX subprocess of a test compiles with."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax_env

ROOT = Path(__file__).resolve().parents[1]


def test_flags_keep_the_callers_and_set_the_device_count_once(monkeypatch):
    monkeypatch.delenv("IDMR_TEST_FULL_OPT", raising=False)
    given = "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=2"
    flags = jax_env.xla_flags_for_tests(given, devices=1).split()
    assert flags[0] == "--xla_cpu_foo=1"
    assert [f for f in flags if f.startswith(jax_env.DEVICE_COUNT_FLAG)] == [f"{jax_env.DEVICE_COUNT_FLAG}=1"]
    # a flag the caller set wins over the fast-compile default
    assert [f for f in flags if f.startswith("--xla_backend_optimization_level")] == [
        "--xla_backend_optimization_level=2"]
    assert "--xla_cpu_use_fusion_emitters=false" in flags
    assert jax_env.xla_flags_for_tests(None).split()[0] == f"{jax_env.DEVICE_COUNT_FLAG}=8"
    # the caller's device count stays when none is asked for
    assert f"{jax_env.DEVICE_COUNT_FLAG}=2" in jax_env.xla_flags_for_tests(f"{jax_env.DEVICE_COUNT_FLAG}=2").split()


def test_full_optimisation_leaves_xla_defaults(monkeypatch):
    monkeypatch.setenv("IDMR_TEST_FULL_OPT", "1")
    assert jax_env.xla_flags_for_tests("", devices=4) == f"{jax_env.DEVICE_COUNT_FLAG}=4"


def test_subprocess_env_carries_this_runs_flags_and_extras(monkeypatch):
    monkeypatch.delenv("IDMR_TEST_FULL_OPT", raising=False)
    env = jax_env.subprocess_env(1, base={"KEEP": "x"}, HF_HUB_OFFLINE="1")
    assert env["KEEP"] == "x" and env["HF_HUB_OFFLINE"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == jax_env.xla_flags_for_tests(os.environ.get("XLA_FLAGS"), 1)
    # this process (set up by conftest.py) already runs with the fast flags
    assert set(jax_env.FAST_COMPILE_FLAGS) <= set(os.environ["XLA_FLAGS"].split())


# A tiny ViT and Q-Former, forward and gradient, under both precision policies; writes every output to an npz.
_PROGRAMS = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from configs import oacir
from idmr_jax.models.qformer import QFormer
from idmr_jax.models.vit import VisionTransformer
from idmr_jax.tasks.oacir.task import model_config

out = {}
for policy in ("float32", "bf16"):
    config = oacir.get_config("tiny")
    config.precision, config.model.freeze_vision = policy, False
    parts = model_config(config).blip2
    vit, qformer = VisionTransformer(parts.vision, rngs=nnx.Rngs(0)), QFormer(parts.qformer, rngs=nnx.Rngs(1))
    pixels = jax.random.normal(jax.random.key(1), (2, 56, 56, 3))
    queries = jax.random.normal(jax.random.key(2), (8, parts.qformer.hidden_size)) * 0.5
    ids = jax.random.randint(jax.random.key(3), (2, 12), 1, 100)

    def loss_fn(models):
        vit, qformer = models
        tokens = vit(pixels).tokens
        hidden = qformer(query_embeds=queries, input_ids=ids, image_embeds=tokens, deterministic=True)
        return jnp.mean(jnp.square(hidden.last_hidden_state.astype(jnp.float32))), tokens

    (loss, tokens), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))((vit, qformer))
    out[f"{policy}/loss"], out[f"{policy}/tokens"] = np.asarray(loss), np.asarray(tokens, np.float32)
    for i, g in enumerate(jax.tree.leaves(nnx.state(grads, nnx.Param))):
        out[f"{policy}/grad{i}"] = np.asarray(g, np.float32)
np.savez(sys.argv[1], **out)
'''


@pytest.mark.slow  # two fresh interpreters at once; the default-flag one compiles at full optimisation (~17 s)
def test_fast_compile_flags_change_no_number(tmp_path):
    """What every other test rests on: the programs compiled with the fast-compile flags compute the numbers XLA's
    defaults give (float32 to rounding; bf16 to a rare last-bit flip of a rounded value)."""
    procs = {}
    for name, flags in (("fast", jax_env.xla_flags_for_tests("", devices=1)),
                        ("full", f"{jax_env.DEVICE_COUNT_FLAG}=1")):
        env = jax_env.subprocess_env(1)
        env["XLA_FLAGS"] = flags  # exactly these: the fast-compile flags, or XLA's defaults
        # Both at once (each compiles on one core): the test costs the slower one's time, not the sum.
        procs[name] = subprocess.Popen([sys.executable, "-c", _PROGRAMS, str(tmp_path / f"{name}.npz")], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-3000:]}"
    results = {name: dict(np.load(tmp_path / f"{name}.npz")) for name in procs}
    fast, full = results["fast"], results["full"]
    assert fast.keys() == full.keys() and len(fast) > 20
    for policy, tol in (("float32", 1e-5), ("bf16", 1e-2)):
        # Each array against its largest value; the gradients against the largest of all of them (some are zero
        # up to rounding, e.g. a bias just before a LayerNorm).
        grad_scale = max(float(np.abs(v).max()) for k, v in full.items() if k.startswith(f"{policy}/grad"))
        for key in (k for k in full if k.startswith(f"{policy}/")):
            scale = grad_scale if "/grad" in key else float(np.abs(full[key]).max())
            np.testing.assert_allclose(fast[key], full[key], rtol=0, atol=tol * scale, err_msg=key)
