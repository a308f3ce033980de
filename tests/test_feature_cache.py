"""Training on cached frozen-encoder tokens (``config.train.cache_frozen_vision``): the cached path gives the uncached
path's examples, loss and gradients, the evaluation reads the cache, and the switch is refused where tokens are not
fixed. Tiny random model (float32) on a small converted OACIRR split (`tests/oacirr_fixtures.py`)."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import oacirr_fixtures as fx
from configs import oacir
from idmr_jax import sharding as shd
from idmr_jax.tasks.oacir.feature_cache import CachedTrainIterator
from idmr_jax.tasks.oacir.task import OacirTask
from idmr_jax.train.state import split_model

BATCH = 8


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_splits")
    train = fx.build_converted(str(root / "raw_train"), str(root / "train"), num_queries=20, num_instances=6,
                               num_shards=2)
    val = fx.build_converted(str(root / "raw_val"), str(root / "val"), split="val", num_queries=12,
                             num_instances=6, num_shards=1, gallery_shards=1)
    return train["out"], val["out"]


def _config(splits, cache: bool, **data):
    config = oacir.get_config("tiny")
    d = config.data
    d.source, d.train_dir, d.val_dir, d.num_workers, d.batch_size = "arrayrecord", splits[0], splits[1], 0, BATCH
    for k, v in data.items():
        d[k] = v
    config.eval.batch_size = 8
    config.train.cache_frozen_vision = cache
    return config


def _loss_and_grads(task, model, batch):
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    graphdef, params, frozen = split_model(model, task.frozen_patterns)
    rng = jax.random.key_data(jax.random.key(3))

    def loss(p):
        m = nnx.merge(graphdef, p, jax.tree.map(lambda x: x, frozen))
        return task.loss_fn(m, batch, rng, mesh=mesh)[0]

    with shd.axis_rules(mesh, shd.DEFAULT_RULES):
        return jax.jit(jax.value_and_grad(loss))(params)


@pytest.fixture(scope="module")
def prepared(splits):
    """(uncached task, cached task after its token pass, the tiny random model both use)."""
    plain, cached = OacirTask(_config(splits, False)), OacirTask(_config(splits, True))
    model = plain.build_model()
    cached.prepare_training(model)
    return plain, cached, model


def test_cached_tokens_give_the_uncached_examples_loss_and_gradients(prepared):
    plain, cached, model = prepared
    it_plain, it_cached = plain.train_iterator(), cached.train_iterator()
    batches = [(next(it_plain), next(it_cached)) for _ in range(3)]  # 20 queries: the 3rd batch is in epoch 2
    encode = nnx.jit(lambda m, pixels: m.vision_tokens(pixels))
    for a, b in batches:
        np.testing.assert_array_equal(b["example_id"], a["example_id"])  # same examples, same order
        for k in ("input_ids", "attention_mask", "box_mask"):
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
        for side in ("ref", "tgt"):  # the cached tokens are the encoder's tokens of the uncached pixels
            np.testing.assert_allclose(b[f"{side}_tokens"], encode(model, a[f"{side}_pixels"]), rtol=1e-5, atol=1e-5)
    a, b = batches[0]
    loss_a, grads_a = _loss_and_grads(plain, model, {k: v for k, v in a.items() if k != "example_id"})
    loss_b, grads_b = _loss_and_grads(cached, model, {k: v for k, v in b.items() if k != "example_id"})
    assert float(loss_a) > 0.1
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    ga, gb = [np.asarray(x) for x in jax.tree.leaves(grads_a)], [np.asarray(x) for x in jax.tree.leaves(grads_b)]
    assert len(ga) == len(gb) > 10
    scale = max(float(np.abs(x).max()) for x in ga)  # some leaves' gradients are float32 noise around zero
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * scale)

    # Resuming: a saved position replays the same batches.
    fresh = CachedTrainIterator(cached.config, 20)
    fresh.attach(it_cached.tables)
    fresh.set_state({"position": BATCH})
    np.testing.assert_array_equal(next(fresh)["example_id"], batches[1][1]["example_id"])


def test_evaluation_reads_the_cached_val_tokens(prepared, splits, tmp_path, monkeypatch):
    from idmr_jax.tasks.oacir import evaluate

    plain, cached, model = prepared
    assert list(cached.feature_cache.val_tokens) == [splits[1]]
    want = plain.evaluate(model, tmp_path / "plain", 0)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the evaluation encoded images although the val tokens are cached")

    monkeypatch.setattr(evaluate.FeatureEncoder, "vision", no_encoding)
    got = cached.evaluate(model, tmp_path / "cached", 0)
    assert got == pytest.approx(want, abs=1e-6)
    assert os.path.exists(tmp_path / "cached" / "eval" / "metrics.json")


@pytest.mark.parametrize("change, reason", [
    (dict(freeze_vision=False), "model.freeze_vision=False"),
    (dict(augment=True), "data.augment=True"),
    (dict(source="fake"), "data.source='fake'"),
])
def test_the_cache_is_refused_unless_the_tokens_are_fixed(splits, change, reason):
    config = _config(splits, True)
    for k, v in change.items():
        (config.model if k == "freeze_vision" else config.data)[k] = v
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        OacirTask(config)
    config.train.cache_frozen_vision = False
    OacirTask(config)  # without the cache the same config builds


def test_an_iterator_without_tokens_names_the_missing_step(splits):
    it = OacirTask(_config(splits, True)).train_iterator()
    with pytest.raises(RuntimeError, match="prepare_training"):
        next(it)
