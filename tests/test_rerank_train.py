"""The reranker's joint training (idmr_jax.tasks.rerank.task, configs/rerank.py:tiny): the joint loss against a
NumPy hand computation from the model's own logits (text-only and with images), masked listwise slots, the
listwise label in the prompt, the embedder's LoRA merged on load, and training steps on a 4x2 mesh that update the
reranker's LoRA and nothing else."""

from __future__ import annotations

import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from PIL import Image

from idmr_jax.config_args import sibling_config
from idmr_jax.models import lora as lora_lib
from idmr_jax.tasks.rerank.prompts import AnswerIds
from idmr_jax.tasks.rerank.task import joint_loss, merged_embedder_weights
from idmr_jax.tasks.universal import mbeir, records

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cup", "dog", "car", "tree", "boat", "lamp", "shoe", "kite"]


def _config(arg="tiny"):
    return sibling_config(str(ROOT / "configs" / "rerank.py"), "rerank.py").get_config(arg)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _side(sid: str, text: str | None, image: bytes | None = None) -> records.Side:
    return records.Side(sid, text, image, records.modality_of(text is not None, image is not None))


def write_pairs(folder: Path, n: int, *, images: bool) -> list[records.TrainingPair]:
    """n pairs, 0 to 3 own negatives each; with `images` some queries and candidates carry an image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = (lambda s: _jpeg(s)) if images else (lambda s: None)  # noqa: E731
        query = _side(f"q{i}", f"find a {WORDS[i % 8]} number {i}", img(i) if i % 2 else None)
        positive = _side(f"p{i}", f"a photo of a {WORDS[i % 8]} tagged {i}", img(100 + i) if i % 3 else None)
        negatives = tuple(_side(f"n{i}.{j}", f"a {WORDS[(i + j + 1) % 8]} tagged {i}x{j}",
                                img(200 + 10 * i + j) if j == 1 else None) for j in range(i % 4))
        out.append(records.TrainingPair(pair_id=f"pair{i}", query=query, instruction_set=(), task_id=0,
                                        dataset_id=0, positive=positive, negatives=negatives, source_index=i,
                                        extra="{}"))
    w = ArrayRecordWriter(str(folder / "train-00000-of-00001.array_record"), "group_size:1")
    for p in out:
        w.write(records.encode_pair(p))
    w.close()
    return out


def _task(folder: Path, **rerank):
    from idmr_jax import tasks

    cfg = _config()
    cfg.data.train_dir = str(folder)
    cfg.sharding.mesh = dict(data=4, fsdp=2, model=1)
    cfg.rerank.update(rerank)
    return tasks.build(cfg)


def _random_model(task, seed=0):
    """Random values (norm scales near 1, LoRA factors too, so the adapters matter) into the abstract model."""
    graphdef, state = nnx.split(nnx.eval_shape(task.build_model))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
        if not np.issubdtype(leaf.dtype, np.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        return (float("scale" in jax.tree_util.keystr(path)) + 0.1 * rng.standard_normal(leaf.shape)).astype(
            leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def _hand_last(model, ids, mask, pixels=None, valid=None):
    """The logits [V] at the last attended position of one prompt, from model.logits on that prompt alone."""
    images = None if pixels is None or not valid.any() else pixels[valid]
    logits = np.asarray(model.logits(ids[None], mask[None], images), np.float64)[0]
    return logits[np.flatnonzero(mask)[-1]]


# ------------------------------------------------------------------ the loss by hand


def test_masked_list_slots_take_no_probability_and_no_gradient():
    answers = AnswerIds(yes=0, no=1, index=(2, 3, 4, 5, 6))
    point = jnp.asarray([[2.0, 0.5, 0, 0, 0, 0, 0], [1.0, 3.0, 0, 0, 0, 0, 0]])
    # Row 0 shows K=2 (slots 3..5 hold huge logits that must not count), row 1 K=5.
    listed = jnp.asarray([[0, 0, 1.0, 2.0, 50.0, 60.0, 70.0], [0, 0, 0.5, 0.1, 0.2, 0.3, 0.4]])
    target, size = jnp.asarray([1, 0]), jnp.asarray([2, 5])
    loss, m = joint_loss(point, jnp.asarray([1, 0]), listed, target, size, answers, pointwise_weight=0.3,
                         listwise_weight=2.0)
    p_ce = [-_log_softmax([2.0, 0.5])[0], -_log_softmax([3.0, 1.0])[0]]  # Yes for row 0, No for row 1
    l_ce = [-_log_softmax([1.0, 2.0])[1], -_log_softmax([0.5, 0.1, 0.2, 0.3, 0.4])[0]]
    np.testing.assert_allclose(float(m["pointwise_loss"]), np.mean(p_ce), rtol=1e-6)
    np.testing.assert_allclose(float(m["listwise_loss"]), np.mean(l_ce), rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.3 * np.mean(p_ce) + 2.0 * np.mean(l_ce), rtol=1e-6)
    assert float(m["pointwise_accuracy"]) == 1.0 and float(m["listwise_accuracy"]) == 1.0
    grad = jax.grad(lambda x: joint_loss(point, jnp.asarray([1, 0]), x, target, size, answers)[0])(listed)
    assert not np.asarray(grad)[0, 4:].any() and np.asarray(grad)[0, 2:4].any()


@pytest.mark.parametrize("images", [False, True])
def test_joint_loss_equals_a_hand_computation_from_the_model_logits(tmp_path, images):
    written = write_pairs(tmp_path, 8, images=images)
    task = _task(tmp_path, images=images, list_max_len=192 if images else 128)
    batch = next(task.train_iterator())
    model = _random_model(task)
    answers = task.answers
    loss, metrics = jax.jit(lambda b: task.loss_fn(model, b, None, mesh=None))(
        {k: v for k, v in batch.items() if k != "example_id"})
    assert np.isfinite(float(loss))
    if images:
        assert batch["point_image_valid"].any() and batch["list_image_valid"].any()
        assert not batch["list_image_valid"].all()  # empty slots next to real images
    point_ce, list_ce = [], []
    for r in range(len(batch["example_id"])):
        pair = written[int(batch["example_id"][r])]
        for j, label in enumerate(batch["point_label"][r]):
            px = (batch["point_pixels"][r, j], batch["point_image_valid"][r, j]) if images else ()
            last = _hand_last(model, batch["point_ids"][r, j], batch["point_mask"][r, j], *px)
            logp = _log_softmax([last[answers.yes], last[answers.no]])
            point_ce.append(-logp[0 if label == 1 else 1])
        k, t = int(batch["list_size"][r]), int(batch["list_target"][r])
        assert 2 <= k <= 5 and 0 <= t < k
        # The label is the positive's shuffled number: "(t+1) <its text>" is in the prompt.
        tokenizer = task_tokenizer(task)
        after = ([task.config.model.image_token_id] if pair.positive.image else
                 tokenizer.tokens(mbeir.uniir_text(pair.positive.text))[:3])
        shown = tokenizer.tokens(f"({t + 1})") + after
        ids = list(batch["list_ids"][r][batch["list_mask"][r] == 1])
        assert any(ids[i:i + len(shown)] == shown for i in range(len(ids))), (r, t)
        px = (batch["list_pixels"][r], batch["list_image_valid"][r]) if images else ()
        last = _hand_last(model, batch["list_ids"][r], batch["list_mask"][r], *px)
        list_ce.append(-_log_softmax(last[list(answers.index[:k])])[t])
    np.testing.assert_allclose(float(metrics["pointwise_loss"]), np.mean(point_ce), rtol=2e-4)
    np.testing.assert_allclose(float(metrics["listwise_loss"]), np.mean(list_ce), rtol=2e-4)
    np.testing.assert_allclose(float(loss), np.mean(point_ce) + np.mean(list_ce), rtol=2e-4)
    assert batch["point_label"].tolist() == [[1, 0]] * len(batch["example_id"])


def task_tokenizer(task):
    from idmr_jax.tasks.rerank.pipeline import layout_of, tokenizers_of

    return tokenizers_of(task, layout_of(task))["listwise"]


def test_embedder_lora_is_merged_into_the_base_on_load():
    class Cfg:
        class text:  # noqa: N801
            lora = lora_lib.LoRAConfig(rank=1, alpha=2.0)

    class Checkpoint:
        model_config = Cfg
        flat = {"lm/q/kernel": np.ones((2, 2), np.float32), "lm/q/lora_a": np.array([[1.0], [2.0]], np.float32),
                "lm/q/lora_b": np.array([[3.0, 4.0]], np.float32), "lm/norm/scale": np.ones(2, np.float32)}

    merged = merged_embedder_weights(Checkpoint)
    assert sorted(merged) == ["lm/norm/scale", "lm/q/kernel"]  # the embedder's factors are gone
    # kernel + A B * alpha / r = 1 + [[3, 4], [6, 8]] * 2
    np.testing.assert_allclose(merged["lm/q/kernel"], [[7.0, 9.0], [13.0, 17.0]])


# ------------------------------------------------------------------ training steps


def test_training_steps_on_a_4x2_mesh_update_only_the_lora(tmp_path):
    from idmr_jax import sharding as shd
    from idmr_jax.train.setup import setup_state
    from idmr_jax.train.state import batch_shardings, flat_variables, make_train_step
    from idmr_jax.train.trainer import global_batch, model_inputs

    write_pairs(tmp_path, 16, images=False)
    task = _task(tmp_path)
    setup = setup_state(task, total_steps=2)
    assert dict(setup.mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
    snapshot = lambda s: {k: np.array(v.get_value()) for k, v in flat_variables(s).items()}  # noqa: E731
    params0, frozen0 = snapshot(setup.state.params), snapshot(setup.state.frozen)
    assert params0 and all(lora_lib.is_lora_path(k) for k in params0)  # only the reranker's LoRA trains
    assert any(k.startswith("vision/") for k in frozen0) and any(k.startswith("lm/") for k in frozen0)
    it = task.train_iterator()
    state = setup.state
    with shd.axis_rules(setup.mesh, setup.rules):
        local = model_inputs(next(it))
        shardings = batch_shardings(setup.mesh, setup.rules, local)
        step = make_train_step(setup.graphdef, task.bind_mesh(setup.mesh), setup.optimizer, setup.schedules,
                               setup.state_shardings, shardings)
        for _ in range(2):
            state, metrics = step(state, global_batch(local, shardings))
            assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
            local = model_inputs(next(it))
    assert {"pointwise_loss", "listwise_loss", "pointwise_accuracy", "listwise_accuracy"} <= set(metrics)
    params1, frozen1 = snapshot(state.params), snapshot(state.frozen)
    assert frozen1.keys() == frozen0.keys()
    for k, v in frozen0.items():
        np.testing.assert_array_equal(frozen1[k], v, err_msg=k)
    changed = [k for k, v in params0.items() if not np.array_equal(params1[k], v)]
    assert any(k.endswith("lora_a") for k in changed) and any(k.endswith("lora_b") for k in changed)
    assert all(np.isfinite(v).all() for v in params1.values())
