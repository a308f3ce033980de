"""The mixed-precision policy (idmr_jax/precision.py): bf16 against float32 on the tiny configs, per model family and
for the full AdaFocal and IDMR losses, within the documented `precision.TOLERANCES`; the dtypes the policy promises
(float32 trainable params and optimiser state, bf16 frozen weights, bf16 gathered features, float32 logits and
loss); the config checks and the mapping of saved configs; and float32 numbers unchanged by the policy."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idmr_jax import precision, tasks
from idmr_jax import sharding as shd
from idmr_jax.config_checks import check_config
from idmr_jax.losses.contrastive import global_infonce, infonce_dense
from idmr_jax.models import efficientnet as E
from idmr_jax.models import layers as L
from idmr_jax.models.crm import ContextualReasoningModule
from idmr_jax.models.decoder_lm import DecoderLM
from idmr_jax.models.layers import Dense
from idmr_jax.models.qformer import QFormer
from idmr_jax.models.vit import VisionTransformer
from idmr_jax.sharding import make_mesh
from idmr_jax.tasks.idmr.task import model_config as idmr_model_config
from idmr_jax.tasks.oacir.task import model_config as oacir_model_config
from idmr_jax.train import optim
from idmr_jax.train.state import split_model
from idmr_jax.train.trainer import model_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import idmr, oacir  # noqa: E402

TOL = precision.TOLERANCES
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


def _config(module, arg: str, policy: str) -> ml_collections.ConfigDict:
    config = module.get_config(arg)
    config.precision = policy
    return config


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)])


def _rel(a, b) -> float:
    """||a - b|| / ||b|| over all leaves."""
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _cosine_gap(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------------------ families


def _module_drift(build, forward, trainable=nnx.Param, out_dtype=None) -> dict[str, float]:
    """Features, loss, gradient and one Adam update of ``build(policy)`` under "bf16" against "float32" (same init:
    the trainable params are float32 under both). The loss is a fixed float32 function of the features, which
    come out in the compute dtype (or `out_dtype`)."""
    out = {}
    for policy, dtype in (("float32", F32), ("bf16", BF16)):
        model = build(policy)
        graphdef, params, rest = nnx.split(model, trainable, ...)
        assert {p.dtype for p in jax.tree.leaves(params)} == {F32}, "trainable params stay float32"

        def step(p, rest, graphdef=graphdef):
            def loss_fn(p):
                feats = forward(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)))
                target = jax.random.normal(jax.random.key(7), feats.shape, jnp.float32)
                return jnp.mean(jnp.square(feats.astype(jnp.float32) - target)), feats

            (loss, feats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
            opt = optax.adamw(1e-3)
            return feats, loss, grads, opt.update(grads, opt.init(p), p)[0]

        out[policy] = jax.jit(step)(params, rest)
        assert out[policy][1].dtype == F32 and out[policy][0].dtype == (out_dtype or dtype)
    (f, l, g, u), (fb, lb, gb, ub) = out["float32"], out["bf16"]
    return {"features": _rel(fb, f), "loss": abs(float(lb) - float(l)) / abs(float(l)),
            "grad": _cosine_gap(gb, g), "step": _rel(ub, u)}


def _assert_within(drift: dict[str, float], what: str) -> None:
    for key, value in drift.items():
        assert value <= TOL[key], f"{what}: bf16 {key} drift {value:.3g} > {TOL[key]} ({drift})"
    # bf16 really ran: some drift, not a float32 program in disguise.
    assert drift["features"] > 1e-4, f"{what}: no bf16 drift at all ({drift})"


def _oacir_parts(policy: str, arg: str = "tiny"):
    """The OACIR model config of `arg` under `policy`, every part trained (so float32 params and the same init)."""
    config = _config(oacir, arg, policy)
    config.model.freeze_vision = False
    return oacir_model_config(config)


def test_vit_drift():
    pixels = jax.random.normal(jax.random.key(1), (4, 56, 56, 3))
    build = lambda policy: VisionTransformer(_oacir_parts(policy).blip2.vision, rngs=nnx.Rngs(0))  # noqa: E731
    _assert_within(_module_drift(build, lambda m: m(pixels).tokens), "ViT")


def test_efficientnet_drift():
    def build(policy):
        vision = _oacir_parts(policy, "demo").blip2.vision  # Lite0 cut to one block per stage, up to stride 16
        backbone = dataclasses.replace(vision.backbone, stages=tuple((1, *st[1:]) for st in E.LITE0_STAGES[:4]))
        return E.EfficientNetPatchEncoder(dataclasses.replace(vision, backbone=backbone), rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    _assert_within(_module_drift(build, lambda m: m(pixels).tokens), "EfficientNet")


def test_qformer_drift():
    queries = jax.random.normal(jax.random.key(1), (8, 64)) * 0.5
    image = jax.random.normal(jax.random.key(2), (4, 17, 64))
    ids = jax.random.randint(jax.random.key(3), (4, 12), 1, 100)
    build = lambda policy: QFormer(_oacir_parts(policy).blip2.qformer, rngs=nnx.Rngs(0))  # noqa: E731
    _assert_within(_module_drift(build, lambda m: m(query_embeds=queries, input_ids=ids, image_embeds=image,
                                                      deterministic=True).last_hidden_state), "Q-Former")


def test_caam_drift():
    probes = jax.random.normal(jax.random.key(1), (4, 8, 64))
    build = lambda policy: ContextualReasoningModule(_oacir_parts(policy).crm, rngs=nnx.Rngs(0))  # noqa: E731
    _assert_within(_module_drift(build, lambda m: m(probes), out_dtype=F32), "CAAM")  # beta: a float32 softplus


def _lm_config(policy: str, lora_rank: int = 0):
    config = _config(idmr, "tiny", policy)
    config.model.lora.rank = lora_rank
    return idmr_model_config(config).text


def test_decoder_lm_drift():
    ids = jax.random.randint(jax.random.key(1), (4, 16), 3, 64)
    build = lambda policy: DecoderLM(_lm_config(policy), rngs=nnx.Rngs(0))  # noqa: E731
    _assert_within(_module_drift(build, lambda m: m(ids)), "decoder LM")


def test_lora_drift_trains_float32_factors_over_a_bf16_base():
    """The IDMR recipe's split: under bf16 the frozen base is stored in bf16, the LoRA factors are float32 and the
    branch computes in bf16; a non-zero B so the adapters matter in the forward pass."""
    ids = jax.random.randint(jax.random.key(1), (4, 16), 3, 64)
    configs = {policy: _lm_config(policy, 4) for policy in ("float32", "bf16")}
    assert (configs["bf16"].param_dtype, configs["bf16"].lora.dtype, configs["bf16"].lora.param_dtype) == (
        "bfloat16", "bfloat16", "float32")

    reference = DecoderLM(configs["float32"], rngs=nnx.Rngs(0))
    lora_b = [var for path, var in nnx.to_flat_state(nnx.state(reference, nnx.Param)) if path[-1] == "lora_b"]
    for i, var in enumerate(lora_b):
        var.set_value(jax.random.normal(jax.random.key(i), var.get_value().shape) * 0.05)

    def build(policy):
        # A bf16 param draws other random numbers than a float32 one: the same init is the reference's, cast (as a
        # checkpoint is when it is loaded into the bf16 base).
        model = DecoderLM(configs[policy], rngs=nnx.Rngs(0))
        nnx.update(model, _cast_like(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param)))
        return model

    lora_only = nnx.All(nnx.Param, lambda path, _: str(path[-1]).startswith("lora_"))
    model = build("bf16")
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora_only))))} == {BF16}
    _assert_within(_module_drift(build, lambda m: m(ids), trainable=lora_only), "LoRA")


def _cast_like(target, source):
    """`source`'s floating-point leaves in `target`'s dtypes (other leaves, e.g. RNG keys, from `target`)."""
    cast = lambda t, s: s.astype(t.dtype) if jnp.issubdtype(t.dtype, jnp.floating) else t  # noqa: E731
    return jax.tree.map(cast, target, source)


def test_bf16_matmul_accumulates_in_float32():
    """4096 products of ones: a bfloat16 accumulator stalls at 256 (256 + 1 rounds back to 256)."""
    dense = Dense(4096, 1, in_axes=(None,), out_axes=(None,), use_bias=False, dtype=BF16,
                  kernel_init=jax.nn.initializers.ones, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(dense, jnp.ones((1, 4096), jnp.float32))
    assert y.dtype == BF16 and float(y[0, 0]) == 4096.0


# ------------------------------------------------------------------------------------------------ full tasks


def _task_step(config, features, frozen_from=None):
    """One train step of `config`'s task as the trainer takes it (its model, split, loss, optimiser, step RNG) in
    one compiled program with the `features` of the batch: (features, metrics, params, frozen, new params,
    optimiser state). The frozen weights are `frozen_from`'s (cast) when given: a bf16 param draws other random
    numbers than a float32 one."""
    task = tasks.build(config)
    mesh = shd.mesh_from_config(config)
    with shd.axis_rules(mesh, shd.rules_from_config(config)):
        graphdef, params, frozen = split_model(task.build_model(), task.frozen_patterns)
        if frozen_from is not None:
            frozen = _cast_like(frozen, frozen_from)
        optimizer, _ = optim.make_optimizer(config.optim, params, total_steps=10)
        batch = {k: jnp.asarray(v) for k, v in model_inputs(next(task.train_iterator())).items()}
        loss_fn = task.bind_mesh(mesh)
        rng = jax.random.fold_in(jax.random.key_data(jax.random.key(config.seed)), 0)  # the trainer's first step

        def step(params, frozen, batch):
            merge = lambda p: nnx.merge(graphdef, p, jax.tree.map(lambda x: x, frozen))  # noqa: E731
            (loss, _), grads = jax.value_and_grad(lambda p: loss_fn(merge(p), batch, rng), has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, optimizer.init(params), params)
            new = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(new)}
            return features(merge(params), batch), metrics, new, opt_state

        feats, metrics, new, opt_state = jax.jit(step)(params, frozen, batch)
    return feats, metrics, params, frozen, new, opt_state


def _oacir_features(model, batch):
    ref, tgt = model.encode_image(batch["ref_pixels"]), model.encode_image(batch["tgt_pixels"])
    query, _ = model.query_features(ref, batch["input_ids"], batch["attention_mask"], batch["box_mask"])
    return query, model.target_features(tgt)


def _idmr_features(model, batch):
    return tuple(model.embed(batch[f"{p}_ids"], batch[f"{p}_mask"], batch[f"{p}_pixels"]) for p in ("query", "cand"))


FEATURES = {oacir: _oacir_features, idmr: _idmr_features}


@pytest.fixture(scope="module")
def tiny_steps():
    """{(config module, policy): _task_step(...)}: one train step of the tiny AdaFocal / IDMR recipes (the vision
    tower frozen, the rest trained) from the same init and batch."""
    runs = {}
    for module in (oacir, idmr):
        for policy in ("float32", "bf16"):
            config = _config(module, "tiny", policy)
            config.model.freeze_vision = True
            reference = runs[module, "float32"][3] if policy == "bf16" else None
            runs[module, policy] = _task_step(config, FEATURES[module], reference)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("module", [oacir, idmr], ids=["adafocal", "idmr"])
def test_full_loss_drift_and_dtypes(tiny_steps, module):
    """The tiny recipes' features, loss and first update under bf16 against float32; under bf16 the features reach
    the loss in bf16, the loss is float32, the trainable params and the optimiser state are float32 and the frozen
    weights bf16."""
    for policy, dt in (("float32", F32), ("bf16", BF16)):
        feats, metrics, _, frozen, new, opt_state = tiny_steps[module, policy]
        assert all(f.dtype == dt for f in feats), "the features reach the loss in the compute dtype"
        assert metrics["loss"].dtype == F32
        assert {x.dtype for x in jax.tree.leaves(new)} == {F32}
        assert {x.dtype for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == {F32}
        stored = [x.dtype for _, x in nnx.to_flat_state(frozen) if isinstance(x, nnx.Param)]
        assert stored and set(stored) == {dt}, "frozen weights are stored in the compute dtype"
    (f, m, p, _, n, _), (fb, mb, pb, _, nb, _) = tiny_steps[module, "float32"], tiny_steps[module, "bf16"]
    np.testing.assert_array_equal(_flat(pb), _flat(p))  # the same init
    drift = {"features": _rel(fb, f), "loss": abs(float(mb["loss"]) - float(m["loss"])) / float(m["loss"]),
             "step": _rel(jax.tree.map(jnp.subtract, nb, pb), jax.tree.map(jnp.subtract, n, p))}
    _assert_within(drift, module.__name__)


@pytest.mark.slow
def test_float32_policy_reproduces_the_numbers_of_before(tiny_steps):
    """The float32 policy gives the model configs the per-module dtype fields gave (all float32 for tiny), and the
    tiny recipes' first step the numbers recorded on the main branch before the policy existed (6b58956: frozen
    vision tower, 8 CPU devices, XLA's default flags; the AdaFocal's with the tiny config's 2-layer Q-Former, run
    there with ``qformer.num_layers=2``). float32 sums over threads vary in the last bits between runs, and the
    tests' fast-compiling XLA flags (jax_env.py) move the AdaFocal's gradient norm by 1.5e-6 of itself: rtol 2e-6."""
    mc = oacir_model_config(oacir.get_config("tiny"))
    assert {mc.blip2.vision.dtype, mc.blip2.vision.param_dtype, mc.blip2.qformer.dtype, mc.blip2.qformer.param_dtype,
            mc.crm.dtype, mc.crm.param_dtype} == {"float32"}
    ic = idmr_model_config(idmr.get_config("tiny"))
    assert {ic.vision.dtype, ic.vision.param_dtype, ic.text.dtype, ic.text.param_dtype, ic.projector_dtype,
            ic.projector_param_dtype} == {"float32"}
    recorded = {oacir: (3.222565174102783, 22.159738540649414, 293.1446838378906),
                idmr: (7.130733966827393, 588.435546875, 33.15911865234375)}
    for module, numbers in recorded.items():
        metrics = tiny_steps[module, "float32"][1]
        got = tuple(float(metrics[k]) for k in ("loss", "grad_norm", "param_norm"))
        np.testing.assert_allclose(got, numbers, rtol=2e-6)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_gathers_bf16_features_and_computes_float32_logits(chunked):
    """Under bf16 the gathered (or ring-passed) features are bf16 and every similarity out of them float32."""
    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    unit = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(BF16)  # noqa: E731
    q = jax.device_put(unit(jax.random.normal(jax.random.key(0), (16, 32))), NamedSharding(mesh, P("data")))
    t = jax.device_put(unit(jax.random.normal(jax.random.key(1), (16, 4, 32))), NamedSharding(mesh, P("data")))
    loss = lambda q, t: global_infonce(q, t, 0.07, mesh=mesh, chunked=chunked)  # noqa: E731
    def moved_dtypes(fn):  # dtypes of the [b, T, E] target blocks that cross devices (not the row statistics)
        moves = [e for e in _eqns(jax.make_jaxpr(fn)(q, t).jaxpr)
                 if e.primitive.name in ("all_gather", "ppermute", "reduce_scatter")]
        return [e.invars[0].aval.dtype for e in moves if e.invars[0].aval.ndim == 3]

    assert set(moved_dtypes(loss)) == {BF16}
    # Backward: the gathered form's reduce-scatter of the targets' gradient is bf16 too; the ring passes the bf16
    # chunks again, with their gradient accumulators in float32 (ring.py: sums over the ring steps stay exact).
    assert set(moved_dtypes(jax.grad(loss, argnums=(0, 1)))) == ({BF16, F32} if chunked else {BF16})
    dots = [e for e in _eqns(jax.make_jaxpr(loss)(q, t).jaxpr) if e.primitive.name == "dot_general"]
    assert dots and {e.outvars[0].aval.dtype for e in dots} == {F32}, "forward similarities are float32"
    value, (gq, gt) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, t)
    assert value.dtype == F32 and gq.dtype == gt.dtype == BF16
    # float32 products of the bf16 values, accumulated in float32: the dense float32 loss on the same values.
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(float(value), float(infonce_dense(f32(q), f32(t), 0.07)), rtol=1e-6)


def _hlo_collectives(hlo: str, op: str) -> list[tuple[str, tuple[int, ...]]]:
    """(element type, shape) of every array `op` (e.g. "all-gather") returns in compiled HLO text, tuples
    (combined collectives) included."""
    results = re.findall(rf"= (\(.*?\)|\S+) {op}(?:-start)?\(", hlo)
    arrays = [a for r in results for a in re.findall(r"(\w+)\[([\d,]*)\]", r)]
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in arrays]


class _FusedAndDense(nnx.Module):
    """A fused Q/K pair and a wide MLP-like Dense over an fsdp-sharded "embed" input axis."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        dense = lambda out, out_axes: Dense(32, out, in_axes=("embed",), out_axes=out_axes,  # noqa: E731
                                            dtype=dtype, rngs=rngs)
        self.q, self.k, self.up = dense((2, 8), ("heads", "kv")), dense((2, 8), ("heads", "kv")), dense(64, ("mlp",))

    def __call__(self, x):
        q, k = L.fused_dense((self.q, self.k), x)
        return jnp.sum(q * k, axis=(-2, -1)) + jnp.sum(self.up(x), axis=-1)


def test_fsdp_weights_are_gathered_in_bf16_with_float32_gradients():
    """Under bf16 a float32 master weight sharded over fsdp is cast shard by shard and all-gathered in bf16 (no full
    float32 copy), its gradient is reduced in float32, and loss and gradients are those of the unconstrained step."""
    mesh = make_mesh({"data": 2, "fsdp": 4, "model": 1})
    rules = shd.DEFAULT_RULES
    x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 3, 32)), NamedSharding(mesh, P(("data", "fsdp"))))
    cot = jax.random.normal(jax.random.key(1), (8, 3))

    def run(dtype, constrained: bool):
        model = _FusedAndDense(dtype, nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        params = jax.device_put(params, shd.state_shardings(params, mesh, rules))
        loss = lambda p, x: jnp.sum(cot * nnx.merge(graphdef, p)(x).astype(F32))  # noqa: E731
        with shd.axis_rules(mesh, rules) if constrained else contextlib.nullcontext():
            step = jax.jit(jax.value_and_grad(loss))
            hlo = step.lower(params, x).compile().as_text()
            jaxpr = str(jax.make_jaxpr(step)(params, x))
            value, grads = step(params, x)
        return value, grads, hlo, jaxpr

    value, grads, hlo, _ = run(BF16, constrained=True)
    ref_value, ref_grads, ref_hlo, _ = run(BF16, constrained=False)
    kernels = {(32, 2, 8), (32, 2, 2, 8), (32, 64)}  # whole kernels (the Q/K pair stacked at compute time)
    gathered = [(t, shape) for t, shape in _hlo_collectives(hlo, "all-gather") if shape in kernels]
    # 16 bits a value: bf16, or on CPU its uint16 bits (XLA:CPU would run a bf16 all-gather in float32).
    assert gathered and {t for t, _ in gathered} == {"u16" if jax.default_backend() == "cpu" else "bf16"}, gathered
    # Without the constraint XLA gathers the float32 master weights: what the constraint removes.
    assert "f32" in {t for t, shape in _hlo_collectives(ref_hlo, "all-gather") if shape in kernels}
    # The weight gradients cross devices in float32 (reduce-scatter, or all-reduce of the partial sums).
    reduced = _hlo_collectives(hlo, "reduce-scatter") + _hlo_collectives(hlo, "all-reduce")
    assert reduced and {t for t, shape in reduced if len(shape) > 1} == {"f32"}, reduced
    assert {g.dtype for g in jax.tree.leaves(grads)} == {F32}
    # Same bf16 products and float32 sums: equal up to the order of the float32 sums.
    assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
    assert _rel(grads, ref_grads) < 1e-5
    # Float32 compute: nothing added, the program of before.
    assert run(F32, constrained=True)[3] == run(F32, constrained=False)[3]


# ------------------------------------------------------------------------------------------------ config


def test_checks_name_the_field():
    config = oacir.get_config("tiny")
    check_config(config)
    for field, value, message in [("precision", "fp16", "config.precision = 'fp16'"),
                                  ("precision_overrides", {"text": "bfloat16"}, "unknown part 'text'"),
                                  ("precision_overrides", {"vision": "half"}, "precision_overrides.vision")]:
        bad = oacir.get_config("tiny")
        bad[field] = value
        with pytest.raises(ValueError, match=message):
            check_config(bad)
    with pytest.raises(TypeError, match="whole config"):
        oacir_model_config(config.model)


def test_overrides_and_frozen_storage():
    config = oacir.get_config("")  # the full recipe: bf16, frozen EVA ViT-g
    mc = oacir_model_config(config)
    assert (mc.blip2.vision.dtype, mc.blip2.vision.param_dtype) == ("bfloat16", "bfloat16")
    assert (mc.blip2.qformer.dtype, mc.blip2.qformer.param_dtype, mc.crm.dtype) == ("bfloat16", "float32",
                                                                                    "bfloat16")
    config.model.freeze_vision = False  # a trained ViT keeps float32 master weights
    assert oacir_model_config(config).blip2.vision.param_dtype == "float32"
    config = oacir.get_config("tiny")
    config.precision_overrides = {"vision": "bfloat16"}
    mc = oacir_model_config(config)
    assert (mc.blip2.vision.dtype, mc.blip2.qformer.dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("module, legacy, policy, overrides", [
    (oacir, {"vision": {"dtype": "bfloat16"}, "qformer": {"dtype": "float32"}}, "float32", {"vision": "bfloat16"}),
    (oacir, {"vision": {"dtype": "float32"}, "qformer": {"dtype": "float32"}}, "float32", {}),
    (idmr, {"vision": {"dtype": "bfloat16"}, "text": {"dtype": "bfloat16", "param_dtype": "float32"}}, "float32",
     {"vision": "bfloat16", "text": "bfloat16", "projector": "bfloat16", "lora": "bfloat16"}),
])
def test_saved_configs_with_module_dtypes_still_load(module, legacy, policy, overrides):
    """A config saved before the policy (per-module dtype fields) maps to the policy + overrides that build the
    same compute dtypes; the old fields are gone, so the resume check compares like with like."""
    saved = module.get_config("").to_dict()
    del saved["precision"], saved["precision_overrides"]
    for node, fields in legacy.items():
        saved["model"][node].update(fields)
    config = precision.upgrade_legacy_config(ml_collections.ConfigDict(saved))
    assert config.precision == policy and dict(config.precision_overrides) == overrides
    assert all(f not in config.model[n] for n, fields in legacy.items() for f in fields)
    precision.check(config)
    _, mc = tasks.model_config_of(config)
    vision, trained = (mc.blip2.vision, mc.blip2.qformer) if module is oacir else (mc.vision, mc.text)
    assert vision.dtype == legacy["vision"]["dtype"]
    assert trained.dtype == (legacy.get("qformer") or legacy.get("text"))["dtype"]
