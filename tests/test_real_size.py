"""`python -m idmr_jax.bench real_size`: the full-size models on a data=2, fsdp=4 mesh of 8 fake CPU devices.

Fast: the sharding report counts bytes exactly and names the tensors the rules fail to split, and the whole
harness (trainer state, compiled step, evaluation) runs on the tiny config. Opt-in (``IDMR_REAL_SIZE=1``): the
paper's OACIR model (EVA ViT-g/14 + BERT-base Q-Former + CAAM): its compilation alone takes minutes on 2 cores,
and its step runs only where XLA's memory plan fits the machine (see BENCHMARKS.md, "Real size").
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idmr_jax import sharding as shd
from idmr_jax.bench import real_size
from idmr_jax.bench.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
RULES = shd.DEFAULT_RULES


class _Params(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.zeros_init()
        self.split = nnx.Param(nnx.with_partitioning(init, ("embed", "mlp"))(rngs.params(), (16, 8), jnp.float32))
        # 6 rows: the rules put "embed" on fsdp (4 devices), which does not divide them.
        self.odd = nnx.Param(nnx.with_partitioning(init, ("embed", None))(rngs.params(), (6, 64), jnp.bfloat16))
        self.whole = nnx.Param(nnx.with_partitioning(init, ("proj", None))(rngs.params(), (32, 8), jnp.float32))


def test_sharding_report_counts_bytes_and_flags_what_the_mesh_leaves_whole():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4, "model": 1})
    with shd.axis_rules(mesh, RULES):
        module = shd.sharded_init(lambda: _Params(nnx.Rngs(0)), mesh, RULES)
    state = types.SimpleNamespace(params=nnx.state(module), frozen=nnx.State({}), opt_state=(jnp.zeros((3,)),))
    r = real_size.sharding_report(state, mesh, RULES, large_bytes=512)
    split, odd, whole = 16 * 8 * 4, 6 * 64 * 2, 32 * 8 * 4
    assert r["parts"]["params"] == {"count": 3, "bytes": split + odd + whole,
                                    "per_device_bytes": split // 4 + odd + whole,
                                    "by_dtype": {"float32": split + whole, "bfloat16": odd}}
    assert r["parts"]["opt_state"]["bytes"] == r["parts"]["opt_state"]["per_device_bytes"] == 12
    assert r["fsdp_sharded"] == {"count": 1, "bytes": split, "per_device_bytes": split // 4}
    assert [x["path"] for x in r["undivided"]] == ["params/odd"]
    assert r["undivided"][0]["axes_dropped"] == ["fsdp"]
    # Held whole on every device and >= 512 bytes; "proj" maps to no mesh axis, so it is not "undivided".
    assert [x["path"] for x in r["replicated_large"]] == ["params/whole", "params/odd"]
    assert r["bytes"] == split + odd + whole + 12


def test_real_size_harness_on_the_tiny_config(tmp_path):
    """The bench's code path (trainer state on the 2x4 mesh, compiled step, task evaluation) on a tiny model."""
    out = tmp_path / "real_size.json"
    r = main(["real_size", "--config=configs/oacir.py:tiny", "--steps=2", "--set=model.qformer.num_layers=2",
              "--set=model.qformer.vocab_size=1024", f"--out={out}"])
    assert json.loads(out.read_text())["suite"] == "real_size"
    assert r["setup"]["mesh"] == {"data": 2, "fsdp": 4, "model": 1} and r["setup"]["batch_size"] == 8
    assert r["ran"] and r["fits"]["fits"]
    assert len(r["losses"]) == 2 and r["loss_finite"]
    assert 0.0 <= r["eval"]["avg"] <= 100.0 and "fake/R@1" in r["eval"]
    # Bytes against an independent count of the model's params (tiny: all float32).
    from idmr_jax.bench.configs import from_file
    from idmr_jax.tasks.oacir.task import OacirTask

    config = from_file(str(ROOT / "configs/oacir.py:tiny"))
    config.model.qformer.num_layers, config.model.qformer.vocab_size = 2, 1024
    abstract = nnx.state(nnx.eval_shape(OacirTask(config).build_model), nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    parts = r["state"]["parts"]
    # Trainable params plus the frozen ViT's (the frozen part also holds RNG state, which is not float32).
    assert parts["params"]["bytes"] + parts["frozen"]["by_dtype"]["float32"] == 4 * n_params
    assert parts["params"]["by_dtype"] == {"float32": parts["params"]["bytes"]}
    # Every tensor of the tiny model splits over fsdp, except ones too small to list.
    fsdp = r["state"]["fsdp_sharded"]
    assert fsdp["per_device_bytes"] * 4 == fsdp["bytes"] and fsdp["bytes"] > 0.99 * r["state"]["bytes"]
    assert r["state"]["replicated_large"] == [] and r["state"]["undivided"] == []
    plan = r["step_memory"]
    assert plan["all_devices_bytes"] == 8 * (plan["argument_size_in_bytes"] + plan["output_size_in_bytes"]
                                             - plan["alias_size_in_bytes"] + plan["temp_size_in_bytes"])
    # The donated state comes back in place: the outputs alias the arguments (the whole state at least).
    assert plan["alias_size_in_bytes"] >= 0.9 * r["state"]["per_device_bytes"]
    t = r["timings"]
    assert t["compile_s"] > 0 and t["init_s"] > 0 and len(t["step_s"]) == 2 and r["peak_rss_bytes"] > 0


def test_before_jax_gives_the_process_exactly_the_mesh_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    real_size.before_jax(["--mesh=1,2,1", "--task=idmr"])
    assert os.environ["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", *real_size.CPU_SIMULATION_FLAGS,
                                               "--xla_force_host_platform_device_count=2"]
    # An option the caller sets is the caller's: not added again, not overridden.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=true")
    real_size.before_jax(["--mesh=2,4,1"])
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_cpu_enable_concurrency_optimized_scheduler=true", real_size.CPU_SIMULATION_FLAGS[0],
        "--xla_force_host_platform_device_count=8"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("IDMR_REAL_SIZE") != "1",
                    reason="opt-in: the paper-size OACIR model on 8 fake CPU devices takes ~9 minutes and ~14 GiB "
                    "(compile, init, 2 steps, evaluation); set IDMR_REAL_SIZE=1")
def test_real_size_oacir_paper_model(tmp_path):
    """configs/oacir.py with no keyword on data=2, fsdp=4: sharded as the rules say, then 2 steps and a small
    evaluation where the step's memory plan fits this machine. In a fresh process (its own memory)."""
    out = tmp_path / "oacir.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "idmr_jax.bench", "real_size", f"--out={out}"], cwd=ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    s = r["state"]
    # The frozen EVA ViT-g (~1B params) is held in bfloat16 and every big tensor is split over fsdp.
    assert s["parts"]["frozen"]["by_dtype"].get("bfloat16", 0) > 1.8e9
    assert s["replicated_large"] == [] and s["undivided"] == []
    assert s["fsdp_sharded"]["per_device_bytes"] * 4 == s["fsdp_sharded"]["bytes"]
    assert s["fsdp_sharded"]["bytes"] > 0.99 * s["bytes"]
    assert s["per_device_bytes"] < 0.26 * s["bytes"]
    if not r["ran"]:
        pytest.skip(f"compiled and sharded as the rules say; not run: {r['fits']['reason']}")
    assert r["loss_finite"] and len(r["losses"]) == 2
    assert "avg" in r["eval"] and 0.0 <= r["eval"]["avg"] <= 100.0
