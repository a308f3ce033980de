"""Optimiser recipes of configs/oacir.py: the release recipe's OneCycle schedule (learning rate and beta1) against
PyTorch's OneCycleLR + AdamW step by step, the paper recipe's parameter groups, and the AdamW hyper-parameters."""

import idmr_jax  # noqa: F401  (flax config)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from configs import oacir
from idmr_jax.models import adafocal as af
from idmr_jax.tasks.oacir.task import OacirTask
from idmr_jax.train import optim
from idmr_jax.train.state import split_model


def group_hyperparams(opt_state) -> dict[str, dict[str, float]]:
    """{group name: the injected hyper-parameters of the update that produced `opt_state`}."""
    partition = [s for s in opt_state if hasattr(s, "inner_states")]
    assert len(partition) == 1
    out = {}
    for name, state in partition[0].inner_states.items():
        found = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "hyperparams"))
        found = [s for s in found if hasattr(s, "hyperparams")]
        assert len(found) == 1
        out[name] = {k: float(v) for k, v in found[0].hyperparams.items()}
    return out


# ----------------------------------------------------------------------------------------------
# Release recipe: one group, AdamW (0.9, 0.98), eps 1e-7, wd 0.05, OneCycleLR with momentum cycling.


@pytest.mark.parametrize("steps_per_epoch, epochs", [(3, 50), (7, 5)])
def test_release_onecycle_matches_pytorch(steps_per_epoch, epochs):
    """Learning rate and beta1 at every update, and the parameters after all of them.

    (3, 50): the released 50-epoch run, warm-up over float(0.03 * 150) - 1 = 3.5 steps; (7, 5): the same
    pct_start on a short run, where the warm-up phase ends at step 0.05 (PyTorch compares `step <= 0.05`).
    """
    total = steps_per_epoch * epochs
    cfg = oacir.get_config("release").optim
    assert cfg.schedule == "onecycle" and cfg.cycle_momentum and [g[0] for g in cfg.groups] == ["all"]

    rng = np.random.default_rng(0)
    p0 = (1e-3 * rng.normal(size=5)).astype(np.float32)
    grads = rng.normal(size=(total, 5)).astype(np.float32)

    weight = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    topt = torch.optim.AdamW([weight], lr=1e-5, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=1e-5, pct_start=1.5 / 50, div_factor=100.0,
                                                steps_per_epoch=steps_per_epoch, epochs=epochs)
    torch_lr, torch_b1 = [], []
    for k in range(total):
        group = topt.param_groups[0]
        torch_lr.append(group["lr"])
        torch_b1.append(group["betas"][0])
        assert group["betas"][1] == 0.98
        weight.grad = torch.from_numpy(grads[k].copy())
        topt.step()
        sched.step()

    params = {"w": jnp.asarray(p0)}
    tx, schedules = optim.make_optimizer(cfg, params, total)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    state = tx.init(params)
    lr, b1 = [], []
    for k in range(total):
        updates, state = step({"w": jnp.asarray(grads[k])}, state, params)
        params = optax.apply_updates(params, updates)
        hp = group_hyperparams(state)["all"]
        lr.append(hp["learning_rate"])
        b1.append(hp["b1"])

    torch_lr, torch_b1 = np.array(torch_lr), np.array(torch_b1)
    # PyTorch's cycle: 1e-7 -> 1e-5 -> 1e-11, beta1 0.95 -> 0.85 -> 0.95 (it overrides AdamW's 0.9).
    # (The peak step need not land exactly on the phase boundary, hence the looser checks on the extremes.)
    assert torch_lr[0] == pytest.approx(1e-7, rel=1e-9) and 0.99e-5 < torch_lr.max() <= 1e-5
    assert torch_b1[0] == pytest.approx(0.95, rel=1e-9) and 0.85 <= torch_b1.min() < 0.851
    np.testing.assert_allclose(lr, torch_lr, rtol=1e-6, atol=0)
    np.testing.assert_allclose(b1, torch_b1, rtol=1e-6, atol=0)
    np.testing.assert_allclose([float(schedules["all"](k)) for k in range(total)], torch_lr, rtol=1e-6, atol=0)
    assert int(np.argmax(lr)) == int(np.argmax(torch_lr))  # the peak lands on the same step
    np.testing.assert_allclose(np.asarray(params["w"]), weight.detach().numpy(), rtol=2e-5, atol=1e-9)


def test_onecycle_past_the_end_holds_final_value():
    cfg = oacir.get_config("release").optim
    lr = optim.lr_schedule(cfg, 1e-5, 100)
    b1 = optim.onecycle_beta1(cfg, 100)
    for k in (99, 100, 1000):
        assert float(lr(k)) == pytest.approx(1e-11, rel=1e-5)
        assert float(b1(k)) == pytest.approx(0.95, rel=1e-6)


def test_release_adamw_hyperparameters():
    cfg = oacir.get_config("release").optim
    params = {"a": jnp.ones((2, 3)), "b": {"c": jnp.ones(4)}}
    tx, _ = optim.make_optimizer(cfg, params, 50)
    hp = group_hyperparams(tx.init(params))
    assert list(hp) == ["all"]
    assert hp["all"]["b2"] == pytest.approx(0.98)
    assert hp["all"]["eps"] == pytest.approx(1e-7, rel=1e-6)
    assert hp["all"]["weight_decay"] == pytest.approx(0.05)
    assert hp["all"]["b1"] == pytest.approx(0.95)  # cycled: OneCycleLR starts beta1 at max_momentum
    assert hp["all"]["learning_rate"] == pytest.approx(1e-7)
    assert cfg.grad_clip_norm == 0  # the release clips nothing


# ----------------------------------------------------------------------------------------------
# Paper recipe: CAAM at 1e-4, everything else that trains at 1e-5; AdamW (0.9, 0.98), eps 1e-8, wd 0.05.


@pytest.fixture(scope="module")
def tiny_trainable():
    """The trainable params of the tiny AdaFocal (abstract) and its task, as the trainer splits them."""
    config = oacir.get_config("tiny")
    config.model.qformer.vocab_size = 128
    task = OacirTask(config)
    abstract = nnx.eval_shape(lambda: af.AdaFocal(task.model_config, rngs=nnx.Rngs(0)))
    _, trainable, _ = split_model(abstract, task.frozen_patterns)
    return trainable


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "name", None) != "value")


def test_paper_group_labels(tiny_trainable):
    cfg = oacir.get_config("paper").optim
    assert [(n, lr) for n, _, lr in cfg.groups] == [("caam", 1e-4), ("qformer", 1e-5)]
    labels = optim.group_labels(tiny_trainable, [(n, rx) for n, rx, _ in cfg.groups])
    flat = {_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}
    assert len(flat) == len(jax.tree.leaves(tiny_trainable))
    assert not any(p.startswith("blip2/vision/") for p in flat)  # frozen: not in the optimiser at all
    caam = sorted(p for p, v in flat.items() if v == "caam")
    assert caam == sorted(p for p in flat if p == "probe_tokens" or p.startswith("crm/"))
    assert "probe_tokens" in caam and "crm/cls_token" in caam and "crm/head_out/kernel" in caam
    others = {p for p, v in flat.items() if v == "qformer"}
    assert others == set(flat) - set(caam)
    for expected in ("blip2/query_tokens", "blip2/ln_vision/scale", "blip2/temp", "blip2/text_proj/kernel",
                     "blip2/qformer/layers/0/crossattention/key/kernel"):
        assert expected in others, expected


def test_paper_first_step_is_adamw_with_group_learning_rates(tiny_trainable):
    """AdamW's first step is exactly -lr * (g / (|g| + eps) + wd * p): checked leaf by leaf with each group's lr."""
    cfg = oacir.get_config("paper").optim
    rng = np.random.default_rng(1)
    fill = lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype))  # noqa: E731
    params = jax.tree.map(fill, tiny_trainable)
    grads = jax.tree.map(fill, tiny_trainable)
    tx, schedules = optim.make_optimizer(cfg, tiny_trainable, 1000)  # built from the abstract state, as in training
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)

    hp = group_hyperparams(state)
    for name, lr in (("caam", 1e-4), ("qformer", 1e-5)):
        assert hp[name]["learning_rate"] == pytest.approx(lr, rel=1e-6)
        assert float(schedules[name](500)) == pytest.approx(lr, rel=1e-6)  # constant
        assert hp[name]["b1"] == pytest.approx(0.9) and hp[name]["b2"] == pytest.approx(0.98)
        assert hp[name]["eps"] == pytest.approx(1e-8, rel=1e-6)
        assert hp[name]["weight_decay"] == pytest.approx(0.05)

    flat_p = {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    flat_g = {_path(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    seen = set()
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        p = _path(path)
        lr = 1e-4 if p == "probe_tokens" or p.startswith("crm/") else 1e-5
        g, w = flat_g[p].astype(np.float64), flat_p[p].astype(np.float64)
        expected = -lr * (g / (np.abs(g) + 1e-8) + 0.05 * w)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-5, atol=1e-12, err_msg=p)
        seen.add(lr)
    assert seen == {1e-4, 1e-5}


@pytest.mark.parametrize("warmup", [0, 7])
def test_warmup_linear_matches_transformers(warmup):
    """IDMR's schedule: transformers' get_linear_schedule_with_warmup, step by step (the value at step k is the
    learning rate of the k-th update, as the torch scheduler gives it before its k-th ``step()``)."""
    from transformers import get_linear_schedule_with_warmup

    total, peak = 40, 2e-5
    cfg = oacir.get_config("release").optim
    cfg.schedule, cfg.warmup_steps = "warmup_linear", warmup
    lr = optim.lr_schedule(cfg, peak, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    want = []
    for _ in range(total + 3):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose([float(lr(k)) for k in range(total + 3)], want, rtol=1e-6, atol=1e-12)


def test_group_start_steps_hold_a_group_then_run_its_schedule_over_the_rest():
    """A delayed group: learning rate 0 and the parameters untouched (weight decay included) before its start,
    then the same schedule shape over the remaining steps; the other group is unaffected."""
    cfg = oacir.get_config("tiny").optim
    cfg.schedule, cfg.warmup_steps, cfg.weight_decay = "warmup_cosine", 2, 0.05
    cfg.groups = [("late", r"^late", 1e-2), ("rest", r".*", 1e-3)]
    cfg.group_start_steps = {"late": 4}
    params = {"late": jnp.ones(3), "rest": jnp.ones(3)}
    tx, schedules = optim.make_optimizer(cfg, params, total_steps=10)
    plain = optim.lr_schedule(cfg, 1e-2, 6)
    assert [float(schedules["late"](s)) for s in range(10)] == pytest.approx(
        [0.0] * 4 + [float(plain(s)) for s in range(6)])
    assert float(schedules["rest"](3)) == pytest.approx(float(optim.lr_schedule(cfg, 1e-3, 10)(3)))
    state, p = tx.init(params), params
    grads = {"late": jnp.full(3, 0.5), "rest": jnp.full(3, 0.5)}
    for step in range(6):
        updates, state = tx.update(grads, state, p)
        p = optax.apply_updates(p, updates)
        if step < 4:
            np.testing.assert_array_equal(p["late"], params["late"])
    assert float(p["late"][0]) < 1.0 and float(p["rest"][0]) < 1.0
    cfg.group_start_steps = {"typo": 4}
    with pytest.raises(ValueError, match="typo"):
        optim.make_optimizer(cfg, params, total_steps=10)
