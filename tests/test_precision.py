"""The mixed-precision policy (idmr_jax/precision.py): bf16 against float32 on the tiny configs, per model family and
for the full AdaFocal and IDMR losses, within the documented `precision.TOLERANCES`; the dtypes the policy promises
(float32 trainable params and optimiser state, bf16 frozen weights, bf16 gathered features, float32 logits and
loss); the config checks and the mapping of saved configs; and float32 numbers unchanged by the policy."""

from __future__ import annotations

import dataclasses
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
from idmr_jax.losses.contrastive import global_infonce
from idmr_jax.models import efficientnet as E
from idmr_jax.models.crm import ContextualReasoningModule
from idmr_jax.models.decoder_lm import DecoderLM
from idmr_jax.models.layers import Dense
from idmr_jax.models.qformer import QFormer
from idmr_jax.models.vit import VisionTransformer
from idmr_jax.sharding import make_mesh
from idmr_jax.tasks.idmr.task import model_config as idmr_model_config
from idmr_jax.tasks.oacir.task import model_config as oacir_model_config
from idmr_jax.train.setup import setup_state
from idmr_jax.train.state import batch_shardings, make_train_step
from idmr_jax.train.trainer import global_batch, model_inputs

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
    """Features, loss, gradient and one Adam update of `build(dtype)` in bf16 against float32 (same init: the
    trainable params are float32 in both). The loss is a fixed float32 function of the features, which come out in
    the compute dtype (or `out_dtype`)."""
    out = {}
    for name, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        model = build(dtype)
        graphdef, params, rest = nnx.split(model, trainable, ...)
        assert all(p.dtype == F32 for p in jax.tree.leaves(params)), "trainable params must stay float32"

        def step(p, rest, graphdef=graphdef):
            def loss_fn(p):
                feats = forward(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)))
                target = jax.random.normal(jax.random.key(7), feats.shape, jnp.float32)
                return jnp.mean(jnp.square(feats.astype(jnp.float32) - target)), feats

            (loss, feats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
            opt = optax.adamw(1e-3)
            return feats, loss, grads, opt.update(grads, opt.init(p), p)[0]

        out[name] = jax.jit(step)(params, rest)
        assert out[name][1].dtype == F32 and out[name][0].dtype == jnp.dtype(out_dtype or dtype)
    (f, l, g, u), (fb, lb, gb, ub) = out["f32"], out["bf16"]
    return {"features": _rel(fb, f), "loss": abs(float(lb) - float(l)) / abs(float(l)),
            "grad": _cosine_gap(gb, g), "step": _rel(ub, u)}


def _assert_within(drift: dict[str, float], what: str) -> None:
    for key, value in drift.items():
        assert value <= TOL[key], f"{what}: bf16 {key} drift {value:.3g} > {TOL[key]} ({drift})"
    # bf16 really ran: some drift, not a float32 program in disguise.
    assert drift["features"] > 1e-4, f"{what}: no bf16 drift at all ({drift})"


def _tiny_part(policy: str, dtype: str):
    """The tiny OACIR model config under `policy` with `dtype` for every part (for the per-family modules)."""
    config = _config(oacir, "tiny", policy)
    config.precision_overrides = {p: dtype for p in precision.PARTS["oacir"]}
    return oacir_model_config(config)


def test_vit_drift():
    def build(dtype):
        cfg = dataclasses.replace(_tiny_part("float32", "float32").blip2.vision, dtype=dtype)
        return VisionTransformer(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (4, 56, 56, 3))
    _assert_within(_module_drift(build, lambda m: m(pixels).tokens), "ViT")


def test_efficientnet_drift():
    def build(dtype):
        backbone = E.EfficientNetLiteConfig(stages=E.LITE0_STAGES[:4], dtype=dtype)  # stride 16 after 4 stages
        return E.EfficientNetPatchEncoder(E.EfficientNetEncoderConfig(backbone=backbone), rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    _assert_within(_module_drift(build, lambda m: m(pixels).tokens), "EfficientNet")


def test_qformer_drift():
    def build(dtype):
        return QFormer(dataclasses.replace(_tiny_part("float32", "float32").blip2.qformer, dtype=dtype),
                       rngs=nnx.Rngs(0))
    queries = jax.random.normal(jax.random.key(1), (8, 64)) * 0.5
    image = jax.random.normal(jax.random.key(2), (4, 17, 64))
    ids = jax.random.randint(jax.random.key(3), (4, 12), 1, 100)
    _assert_within(_module_drift(build, lambda m: m(query_embeds=queries, input_ids=ids, image_embeds=image,
                                                      deterministic=True).last_hidden_state), "Q-Former")


def test_caam_drift():
    def build(dtype):
        return ContextualReasoningModule(dataclasses.replace(_tiny_part("float32", "float32").crm, dtype=dtype),
                                         rngs=nnx.Rngs(0))
    probes = jax.random.normal(jax.random.key(1), (4, 8, 64))
    _assert_within(_module_drift(build, lambda m: m(probes), out_dtype=F32), "CAAM")  # beta: a float32 softplus


def _lm_config(policy: str, lora_rank: int = 0):
    config = _config(idmr, "tiny", policy)
    config.model.lora.rank = lora_rank
    return idmr_model_config(config).text


def test_decoder_lm_drift():
    ids = jax.random.randint(jax.random.key(1), (4, 16), 3, 64)
    drift = _module_drift(lambda dtype: DecoderLM(dataclasses.replace(_lm_config("float32"), dtype=dtype),
                                                  rngs=nnx.Rngs(0)), lambda m: m(ids))
    _assert_within(drift, "decoder LM")


def test_lora_drift_trains_float32_factors_over_a_bf16_base():
    """The IDMR recipe's split: under bf16 the frozen base is stored in bf16, the LoRA factors are float32 and the
    branch computes in bf16; a non-zero B so the adapters matter in the forward pass."""
    ids = jax.random.randint(jax.random.key(1), (4, 16), 3, 64)
    configs = {"float32": _lm_config("float32", 4), "bfloat16": _lm_config("bf16", 4)}
    assert configs["bfloat16"].param_dtype == "bfloat16" and configs["bfloat16"].lora.dtype == "bfloat16"
    assert configs["bfloat16"].lora.param_dtype == "float32"

    reference = DecoderLM(configs["float32"], rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
        if path[-1] == "lora_b":
            var.set_value(jax.random.normal(jax.random.key(len(path)), var.get_value().shape) * 0.05)

    def build(dtype):
        # A bf16 param draws other random numbers than a float32 one: the same init is the reference's, cast (as a
        # checkpoint is when it is loaded into the bf16 base).
        model = DecoderLM(configs[dtype], rngs=nnx.Rngs(0))
        nnx.update(model, _cast_like(nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param)))
        return model

    lora_only = nnx.All(nnx.Param, lambda path, _: str(path[-1]).startswith("lora_"))
    model = build("bfloat16")
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


def _task_step(config, frozen_from=None):
    """(task, model built by the trainer's setup, the batch, the train state, metrics after one step). The frozen
    weights are `frozen_from`'s (cast) when given: a bf16 frozen param's random init differs from a float32 one."""
    task = tasks.build(config)
    local = model_inputs(next(task.train_iterator()))
    setup = setup_state(task, total_steps=10)
    with shd.axis_rules(setup.mesh, setup.rules):
        sh = batch_shardings(setup.mesh, setup.rules, local)
        step = make_train_step(setup.graphdef, task.bind_mesh(setup.mesh), setup.optimizer, setup.schedules,
                               setup.state_shardings, sh)
        batch = global_batch(local, sh)
        before = setup.state
        if frozen_from is not None:
            before = before.replace(frozen=_cast_like(before.frozen, frozen_from))
        model = nnx.merge(setup.graphdef, before.params, before.frozen)
        after, metrics = step(jax.tree.map(jnp.copy, before), batch)
    return task, model, batch, before, after, metrics


def _oacir_features(model, batch):
    ref, tgt = model.encode_image(batch["ref_pixels"]), model.encode_image(batch["tgt_pixels"])
    query, _ = model.query_features(ref, batch["input_ids"], batch["attention_mask"], batch["box_mask"])
    return query, model.target_features(tgt)


def _idmr_features(model, batch):
    return tuple(model.embed(batch[f"{p}_ids"], batch[f"{p}_mask"], batch[f"{p}_pixels"]) for p in ("query", "cand"))


@pytest.mark.parametrize("module, features", [(oacir, _oacir_features), (idmr, _idmr_features)],
                         ids=["adafocal", "idmr"])
def test_full_loss_drift_and_dtypes(module, features):
    """One train step of the tiny AdaFocal / IDMR recipes (the vision tower frozen, the rest trained) under bf16
    against float32 from the same init and batch; under bf16 the trainable params and the optimiser state are
    float32, the frozen ones bf16."""
    runs = {}
    for policy in ("float32", "bf16"):
        config = _config(module, "tiny", policy)
        config.model.freeze_vision = True
        reference = runs["float32"][2].frozen if runs else None
        task, model, batch, before, after, metrics = _task_step(config, reference)
        feats = nnx.jit(features)(model, batch)
        runs[policy] = (feats, metrics, before, after)
        dt = BF16 if policy == "bf16" else F32
        assert all(f.dtype == dt for f in feats), "the features reach the loss in the compute dtype"
        assert metrics["loss"].dtype == F32
        assert {x.dtype for x in jax.tree.leaves(after.params)} == {F32}
        assert {x.dtype for x in jax.tree.leaves(after.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)} == {F32}
        frozen = [x.dtype for path, x in nnx.to_flat_state(after.frozen) if isinstance(x, nnx.Param)]
        assert frozen and set(frozen) == {dt}, "frozen weights are stored in the compute dtype"
    (f, m, b, a), (fb, mb, bb, ab) = runs["float32"], runs["bf16"]
    np.testing.assert_array_equal(_flat(bb.params), _flat(b.params))  # the same init
    drift = {"features": _rel(fb, f), "loss": abs(float(mb["loss"]) - float(m["loss"])) / float(m["loss"]),
             "step": _rel(jax.tree.map(jnp.subtract, ab.params, bb.params),
                          jax.tree.map(jnp.subtract, a.params, b.params))}
    _assert_within(drift, module.__name__)


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_gathers_bf16_features_and_computes_float32_logits(chunked):
    """Under bf16 the gathered (or ring-passed) features are bf16 and every similarity out of them float32."""
    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    q = jax.device_put(jnp.ones((16, 32), BF16), NamedSharding(mesh, P("data")))
    t = jax.device_put(jnp.ones((16, 4, 32), BF16), NamedSharding(mesh, P("data")))
    loss = lambda q, t: global_infonce(q, t, 0.07, mesh=mesh, chunked=chunked)  # noqa: E731
    for jaxpr in (jax.make_jaxpr(loss)(q, t).jaxpr, jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, t).jaxpr):
        moves = [e for e in _eqns(jaxpr) if e.primitive.name in ("all_gather", "ppermute", "reduce_scatter")]
        feature_moves = [e for e in moves if e.invars[0].aval.ndim == 3]  # the [b, T, E] targets (not row stats)
        assert feature_moves and {e.invars[0].aval.dtype for e in feature_moves} == {BF16}
    dots = [e for e in _eqns(jax.make_jaxpr(loss)(q, t).jaxpr) if e.primitive.name == "dot_general"]
    assert dots and {e.outvars[0].aval.dtype for e in dots} == {F32}, "forward similarities are float32"
    value, (gq, gt) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, t)
    assert value.dtype == F32 and gq.dtype == gt.dtype == BF16
    np.testing.assert_allclose(float(value), np.log(16), rtol=1e-6)  # equal features: uniform logits


# ------------------------------------------------------------------------------------------------ config


def test_float32_policy_builds_the_models_of_before():
    """The float32 policy gives exactly the model configs the per-module dtype fields gave (all float32 for tiny),
    and the tiny recipes' first step reproduces the numbers recorded before the policy existed."""
    mc = oacir_model_config(oacir.get_config("tiny"))
    assert {mc.blip2.vision.dtype, mc.blip2.vision.param_dtype, mc.blip2.qformer.dtype, mc.blip2.qformer.param_dtype,
            mc.crm.dtype, mc.crm.param_dtype} == {"float32"}
    ic = idmr_model_config(idmr.get_config("tiny"))
    assert {ic.vision.dtype, ic.vision.param_dtype, ic.text.dtype, ic.text.param_dtype, ic.projector_dtype,
            ic.projector_param_dtype} == {"float32"}
    # Recorded on the main branch before config.precision (float32 everywhere), 8 CPU devices.
    recorded = {oacir: (5.171382427215576, 77.63626098632812, 301.62127685546875),
                idmr: (7.130733966827393, 607.1205444335938, 38.939727783203125)}
    for module, numbers in recorded.items():
        metrics = _task_step(module.get_config("tiny"))[-1]
        got = tuple(float(metrics[k]) for k in ("loss", "grad_norm", "param_norm"))
        np.testing.assert_allclose(got, numbers, rtol=1e-6)


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
