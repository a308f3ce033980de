"""The benchmark harness (`python -m idmr_jax.bench`): every suite runs at tiny sizes and writes its JSON, and
the numbers the suites rest on are checked against independent references (the PyTorch baseline computes the
same loss as the JAX step; the analytic FLOPs match XLA's count; the top-k agrees with NumPy; the chunked
loss's memory stays flat)."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idmr_jax import precision
from idmr_jax.bench import configs, flops, train_step
from idmr_jax.bench.__main__ import main
from idmr_jax.models.qformer import QFormer, QFormerConfig
from idmr_jax.models.vit import VisionTransformer, vit_config


def _run(tmp_path, suite, *flags):
    out = tmp_path / f"{suite}.json"
    result = main([suite, f"--out={out}", *flags])
    assert json.loads(out.read_text())["suite"] == suite
    return result


@pytest.fixture(scope="module")
def train_step_json(tmp_path_factory):
    """One tiny side-by-side run, shared by the train_step and input checks (compiling a step dominates)."""
    tmp = tmp_path_factory.mktemp("bench")
    result = _run(tmp, "train_step", "--config=tiny,baseline", "--devices=1", "--compare=torch", "--reps=2",
                  "--warmup=1", "--only", "--dtype=float32", "--peak-sizes=128,256")
    return tmp / "train_step.json", result


def test_train_step_against_the_torch_baseline(train_step_json):
    _, r = train_step_json
    # Same weights, same batch, dropout off: both sides compute the same loss, so their timings compare.
    assert r["parity"]["abs_diff"] <= 1e-4, r["parity"]
    assert list(r["comparisons"]) == ["float32/none"] and r["ratios"] == {"float32/none": r["ratio"]}
    assert r["model"]["params"]["trainable"] == r["torch"]["trainable_params"]
    assert r["model"]["beta_mode"] == "none"
    assert r["ratio"] == pytest.approx(r["jax"]["examples_per_s"] / r["torch"]["examples_per_s"])
    for side in ("jax", "torch"):
        assert r[side]["reps"] == 2 and r[side]["min_s"] <= r[side]["median_s"] <= r[side]["max_s"]
        assert np.isfinite(r[side]["last_loss"])
    _check_roofline(r, "float32", reps=2)


def _check_roofline(r, dtype, *, reps):
    """The roofline block: the peak timed in every rep at the compute dtype, and the utilisations, the ceiling
    and the target's utilisation consistent with the measured step times."""
    roof = r["roofline"]
    assert roof["peak"]["dtype"] == dtype and [s["n"] for s in roof["peak"]["sizes"]] == [128, 256]
    assert all(s["reps"] == reps for s in roof["peak"]["sizes"])
    assert roof["peak_flops_per_s"] == max(s["flops_per_s"] for s in roof["peak"]["sizes"])
    at_peak = roof["model_flops"] / roof["peak_flops_per_s"]
    assert roof["jax_utilisation"] == pytest.approx(at_peak / r["jax"]["median_s"])
    assert roof["ratio_ceiling"] == pytest.approx(r["torch"]["median_s"] / at_peak)
    # Same matmuls on both sides: the wall ratio is the ratio of the two utilisations of one peak.
    assert r["ratio"] == pytest.approx(roof["jax_utilisation"] / roof["torch_utilisation"])
    assert roof["jax_utilisation_for_target"] == pytest.approx(train_step.TARGET_RATIO * roof["torch_utilisation"])
    assert 0 < roof["jax_utilisation"] < 1 and roof["ratio_ceiling"] > r["ratio"]


def test_roofline_counts_the_matmuls_each_side_runs():
    """Identical work, one FLOP count: the cached-ViT comparison drops exactly the two images' ViT forward."""
    config = configs.load("tiny,baseline", dtype="bfloat16")
    mc = configs.model_config(config)
    bs = int(config.data.batch_size)
    uncached = train_step.step_model_flops(config, bs, "none")
    assert uncached == flops.train_step_flops(mc, bs, int(config.data.max_text_len))["total"]
    vit = 2 * bs * flops.vit_forward(mc.blip2.vision, mc.image_size)
    assert train_step.step_model_flops(config, bs, "both") == uncached - vit
    # 1 GFLOP at 1 TFLOP/s is 1 ms: a 4 ms JAX step uses 25% of the peak, a 2 ms PyTorch step 50%; the ceiling is
    # 2 ms / 1 ms, and the target ratio needs 1.5 x 50% of the peak from JAX.
    roof = train_step.roofline(1e9, 1e12, jax_s=4e-3, torch_s=2e-3)
    assert roof["jax_utilisation"] == pytest.approx(0.25) and roof["torch_utilisation"] == pytest.approx(0.5)
    assert roof["ratio_ceiling"] == pytest.approx(2.0) and roof["matmuls_at_peak_s"] == pytest.approx(1e-3)
    assert roof["jax_utilisation_for_target"] == pytest.approx(0.75)


def test_cached_vit_features_change_no_number(tmp_path):
    """JAX reads the frozen ViT's cached output while torch runs the ViT on the pixels: the same loss, so the
    cached step is the recipe's step and its timing compares with the uncached PyTorch one."""
    r = _run(tmp_path, "train_step", "--config=tiny,baseline", "--devices=1", "--compare=torch", "--reps=1",
             "--warmup=1", "--vit-cache=jax", "--only", "--dtype=float32")
    assert r["model"]["vit_cache"] == "jax"
    assert r["parity"]["abs_diff"] <= 1e-4, r["parity"]
    assert "roofline" not in r  # the two sides do different work: no common FLOP count


def test_train_step_bf16_against_torch_autocast(tmp_path):
    """The suite's default comparison (bf16, the ViT every step on both sides) at tiny size: PyTorch under
    autocast computes the JAX bf16 step's loss within the precision policy's documented loss tolerance."""
    r = _run(tmp_path, "train_step", "--config=tiny,baseline", "--devices=1", "--compare=torch", "--reps=1",
             "--warmup=1", "--only", "--peak-sizes=128,256")
    assert r["default"] == "bfloat16/none" and list(r["comparisons"]) == ["bfloat16/none"]
    assert r["model"]["precision"] == "bf16" and r["model"]["vit_cache"] == "none"
    assert r["torch"]["autocast"] == "bfloat16" and r["torch"]["threads"] == train_step.cpu_threads()
    p = r["parity"]
    assert p["tolerance"] == {"rel": precision.TOLERANCES["loss"]}
    assert p["within_tolerance"] and p["abs_diff"] <= precision.TOLERANCES["loss"] * abs(p["loss_jax"]), p
    assert p["abs_diff"] > 0  # bf16 rounding on both sides: an exact match would mean float32 ran
    assert r["ratio"] == pytest.approx(r["jax"]["examples_per_s"] / r["torch"]["examples_per_s"])
    _check_roofline(r, "bfloat16", reps=1)


def test_train_step_runs_the_comparison_matrix_by_default():
    """Without --only, --compare=torch runs float32 and bfloat16, each uncached and cached, the default first."""
    parser = argparse.ArgumentParser()
    train_step.add_args(parser)
    args = parser.parse_args(["--compare=torch"])
    assert train_step.comparisons(args) == [("bfloat16", "none"), ("float32", "none"), ("float32", "both"),
                                            ("bfloat16", "both")]
    args = parser.parse_args(["--compare=torch", "--dtype=float32", "--vit-cache=jax"])
    assert train_step.comparisons(args)[0] == ("float32", "jax") and len(train_step.comparisons(args)) == 5
    assert train_step.comparisons(parser.parse_args(["--compare=torch", "--only"])) == [("bfloat16", "none")]
    tol = train_step.parity_tolerance("bfloat16")
    assert train_step.within_tolerance({"abs_diff": 0.9 * tol["rel"] * 2.0, "loss_jax": -2.0}, tol)
    assert not train_step.within_tolerance({"abs_diff": 1.1 * tol["rel"] * 2.0, "loss_jax": 2.0}, tol)
    assert not train_step.within_tolerance({"abs_diff": 2e-4, "loss_jax": 2.0}, train_step.parity_tolerance("float32"))


def test_mfu_suite(tmp_path, train_step_json):
    # The same config as the train_step run: this process reuses its built and compiled step.
    r = _run(tmp_path, "mfu", "--config=tiny,baseline", "--devices=1", "--reps=2", "--warmup=1",
             "--peak-sizes=128,256")
    # XLA also counts elementwise work and the optimiser: a little above the matmul-only model FLOPs.
    assert 1.0 <= r["flops"]["xla_over_analytic"] <= 1.5
    assert r["peak"]["best_flops_per_s"] == max(s["flops_per_s"] for s in r["peak"]["sizes"])
    assert r["utilisation"] == pytest.approx(
        r["flops"]["analytic"]["total"] / r["step"]["median_s"] / r["peak"]["best_flops_per_s"])
    best = max(r["peak"]["best_flops_per_s"], r["peak_numpy_blas"]["best_flops_per_s"])
    assert r["utilisation_vs_best_peak"] == pytest.approx(r["achieved_flops_per_s_per_device"] / best)


def _xla_flops(build, fn, *inputs):
    """XLA's FLOP count of ``fn(module, *inputs)``, traced on abstract params (nothing is initialised or run)."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    lowered = jax.jit(lambda st, *xs: fn(nnx.merge(graphdef, st), *xs)).lower(state, *inputs)
    cost = lowered.cost_analysis()  # the unoptimised program's count: no compilation needed
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_analytic_flops_match_xla_on_the_matmul_heavy_parts():
    """At the mid-size widths the matmuls dominate, so XLA's count (which adds elementwise work) is within a few
    percent of the analytic matmul count, and never below it."""
    cfg = vit_config("eva-g/14", width=256, depth=2, num_heads=4, mlp_dim=1024)
    pixels = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    got = _xla_flops(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)), lambda m, x: m(x).tokens, pixels)
    want = flops.vit_forward(cfg, 224)
    assert want <= got <= 1.05 * want

    qcfg = QFormerConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, encoder_hidden_size=256,
                         vocab_size=100, max_position_embeddings=64)
    args = (jax.ShapeDtypeStruct((1, 32, 256), jnp.float32), jax.ShapeDtypeStruct((1, 32), jnp.int32),
            jax.ShapeDtypeStruct((1, 257, 256), jnp.float32))
    got = _xla_flops(lambda: QFormer(qcfg, rngs=nnx.Rngs(0)),
                     lambda m, q, i, im: m(q, i, None, im).last_hidden_state, *args)
    want = flops.qformer_forward(qcfg, 32, 32, 257)
    assert want <= got <= 1.08 * want


def test_retrieval_suite_agrees_with_numpy(tmp_path):
    r = _run(tmp_path, "retrieval", "--sizes=1000", "--queries=24", "--k=7", "--tokens=4", "--dim=16",
             "--chunk=128", "--query-chunk=10", "--numpy-ref-max=1000", "--reps=2")
    assert [row["n"] for row in r["sizes"]] == [1000]  # 7 full chunks and a remainder
    for row in r["sizes"]:
        assert row["numpy_blas"]["agree"] == 1.0 and row["numpy_reference"]["agree"] == 1.0
        assert row["jax"]["peak_memory_bytes"] > row["gallery_bytes"]


def test_retrieval_suite_sharded(tmp_path):
    r = _run(tmp_path, "retrieval", "--sizes=500", "--queries=8", "--k=5", "--tokens=4", "--dim=8", "--chunk=16",
             "--query-chunk=0", "--numpy-ref-max=0", "--reps=1", "--shard", "--dtype=float32")
    assert r["setup"]["sharded_over"] == 8 and r["sizes"][0]["n"] == 504  # padded to whole shards
    assert r["sizes"][0]["numpy_blas"]["agree"] == 1.0


def test_input_suite(tmp_path, train_step_json):
    path, step = train_step_json
    r = _run(tmp_path, "input", "--workers=0", "--step-config=tiny,baseline", f"--step-json={path}",
             "--demo-size=tiny", f"--demo-cache={tmp_path / 'demo'}", "--examples=16")
    (row,) = r["pipeline"]["results"]
    assert row["num_workers"] == 0 and row["examples"] >= 16 and row["examples_per_s"] > 0
    assert r["train_step"]["examples_per_s"] == step["jax"]["examples_per_s"]
    assert r["headroom"]["0"] == pytest.approx(row["examples_per_s"] / r["train_step"]["examples_per_s"])


def test_loss_memory_suite_chunked_stays_flat(tmp_path):
    r = _run(tmp_path, "loss_memory", "--devices=4,8", "--per-device-batch=4", "--tokens=4", "--dim=8")
    gathered, chunked = r["temp_bytes"]["gathered"], r["temp_bytes"]["chunked"]
    assert gathered["8"] > 1.5 * gathered["4"]
    assert chunked["8"] == chunked["4"]


class _BusyStep:
    """A stand-in for the JAX step that computes on one core for `seconds` per step."""

    batch_size = 4

    def __init__(self, seconds: float):
        self.seconds = seconds

    def run(self):
        import time

        t0 = time.process_time()
        while time.process_time() - t0 < self.seconds:
            pass
        return {"loss": 1.0}

    def sync(self, metrics):
        pass


class _WaitingStep:
    """A stand-in for the PyTorch step that waits for `seconds` per step without computing."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def step(self, batch):
        import time

        time.sleep(self.seconds)
        return 1.0


def test_cpu_time_tells_computing_from_waiting():
    """The timing reports each side's CPU time and cores kept busy: a side that computes on one core reads about
    one core, a side that sleeps as long reads about none, and the CPU work ratio follows their CPU times."""
    r = train_step.time_alternating(_BusyStep(0.05), _WaitingStep(0.05), None, reps=3, steps_per_rep=2)
    jax_side, torch_side = r["jax"], r["torch"]
    assert jax_side["cpu_s_median"] >= 0.05 and torch_side["cpu_s_median"] < 0.25 * jax_side["cpu_s_median"], r
    # One busy thread keeps about one core busy (a loaded machine may take part of it, and the process's other
    # threads may add a little); the sleeping side next to none.
    assert 0.15 < jax_side["cores_busy_median"] <= 1.5, r
    assert torch_side["cores_busy_median"] < 0.25 * jax_side["cores_busy_median"], r
    assert r["cpu_work_ratio"] == pytest.approx(torch_side["cpu_s_median"] / jax_side["cpu_s_median"])
    assert r["ratio"] == pytest.approx(jax_side["examples_per_s"] / torch_side["examples_per_s"])
    assert r["steps_per_rep"] == 2 and jax_side["reps"] == torch_side["reps"] == 3
