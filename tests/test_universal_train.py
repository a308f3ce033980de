"""The universal task's training: any-modality pairs through the Grain pipeline, image slots packed per device
block, and the loss over every device's candidates (and each query's hard negatives) against a dense reference on a
4x2 mesh, forward and backward; text-only rows never reach the vision tower."""

from __future__ import annotations

import io
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from idmr_jax.config_args import sibling_config
from idmr_jax.losses.contrastive import global_infonce, infonce_dense
from idmr_jax.sharding import make_mesh
from idmr_jax.tasks.universal import pipeline as pairs
from idmr_jax.tasks.universal import records

ROOT = Path(__file__).resolve().parents[1]


def _config(arg):
    """configs/instructcir.py:ARG, loaded by path as ml_collections loads config files."""
    return sibling_config(str(ROOT / "configs" / "instructcir.py"), "instructcir.py").get_config(arg)


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _side(kind: str, i: int, role: str) -> records.Side:
    text = f"{role} text number {i} about a red {['cup', 'dog', 'car'][i % 3]}"
    image = _jpeg(1000 * len(role) + i)
    modality = {"t": "text", "i": "image", "it": "image,text"}[kind]
    return records.Side(id=f"{role}:{i}", text=None if modality == "image" else text,
                        image=None if modality == "text" else image, modality=modality)


# (query, positive, negatives) modalities per pair: every mixture, negatives from 0 to 2 of them.
MIX = [("i", "t", ("t",)), ("t", "i", ()), ("it", "i", ("i", "t")), ("it", "t", ()), ("t", "t", ("it",)),
       ("i", "it", ()), ("it", "it", ("t",)), ("t", "i", ("i",))]


def write_pairs(folder: Path, n: int = 24, shards: int = 2) -> list[records.TrainingPair]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        q, pos, negs = MIX[i % len(MIX)]
        out.append(records.TrainingPair(
            pair_id=f"p{i}", query=_side(q, i, "query"), instruction_set=("Find the match.", "Retrieve it.")[: i % 3],
            task_id=0, dataset_id=0, positive=_side(pos, i, "pos"),
            negatives=tuple(_side(k, 10 * i + j, "neg") for j, k in enumerate(negs)), source_index=i, extra="{}"))
    per = -(-n // shards)
    for s in range(shards):
        w = ArrayRecordWriter(str(folder / f"train-{s:05d}-of-{shards:05d}.array_record"), "group_size:1")
        for p in out[s * per:(s + 1) * per]:
            w.write(records.encode_pair(p))
        w.close()
    return out


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return folder, write_pairs(folder)


def _tiny(pair_dir, **data):
    cfg = _config("tiny,stage=2")
    cfg.data.train_dir = str(pair_dir[0])
    cfg.data.image_slots.update(dict(query=-1, cand=-1, hn=-1))
    cfg.model.init.format = "random"
    cfg.sharding.mesh = dict(data=4, fsdp=2, model=1)
    cfg.data.update(data)
    return cfg


# ------------------------------------------------------------------------------------------------ records, data


def test_pair_records_round_trip_and_name_the_bad_field(pair_dir):
    _, written = pair_dir
    assert records.read_pairs(str(pair_dir[0] / "train-*.array_record")) == written
    raw = records.encode_pair(written[2]).replace(b"image,text", b"text\x00\x00\x00\x00\x00\x00", 1)
    with pytest.raises(records.RecordError, match=r"query\.(text|modality|image)"):
        records.decode_pair(raw)
    bad = records.TrainingPair(**{**written[2].__dict__, "negatives": (records.Side("n", None, None, "text"),)})
    with pytest.raises(records.RecordError, match=r"negatives\[0\]\.text"):
        records.encode_pair(bad)


def test_pack_images_keeps_row_order_per_device_block():
    rows = np.arange(8, dtype=np.float32)[:, None, None, None] * np.ones((8, 2, 2, 3), np.float32)
    has = np.array([0, 1, 1, 0, 0, 0, 1, 1], bool)  # blocks of 2 rows: [0 1] [1 0] [0 0] [1 1]
    packed = pairs.pack_images(rows, has, num_blocks=4, slots=2, side="query")
    assert packed.shape == (8, 2, 2, 3)
    np.testing.assert_array_equal(packed[:, 0, 0, 0], [1, 0, 2, 0, 0, 0, 6, 7])
    with pytest.raises(ValueError, match="image_slots.query"):
        pairs.pack_images(rows, has, num_blocks=4, slots=1, side="query")
    # rows_from_slots (the model side) undoes the packing, zeros for rows without an image.
    from idmr_jax.tasks.universal.model import rows_from_slots

    back = np.asarray(rows_from_slots(jnp.asarray(packed), jnp.asarray(has), 4))
    np.testing.assert_array_equal(back, rows * has[:, None, None, None])


def test_pipeline_mixes_modalities_draws_instructions_and_carries_hard_negatives(pair_dir):
    from idmr_jax.tasks import build

    written = {p.pair_id: p for p in pair_dir[1]}
    cfg = _tiny(pair_dir, num_hard_negatives=2, batch_size=16)
    task = build(cfg)
    it = task.train_iterator()
    batch = next(it)
    rows = [written[f"p{k}"] for k in batch["example_id"]]
    for prefix, sides in (("query", [p.query for p in rows]), ("cand", [p.positive for p in rows])):
        np.testing.assert_array_equal(batch[f"{prefix}_has_image"], [s.image is not None for s in sides])
        # Image tokens exactly where the side has an image.
        image_tokens = (batch[f"{prefix}_ids"] == cfg.model.image_token_id).sum(axis=1)
        np.testing.assert_array_equal(image_tokens > 0, batch[f"{prefix}_has_image"])
        assert batch[f"{prefix}_pixels"].shape[0] == 16  # 8 device blocks x 2 slots (-1: a slot per row)
    assert batch["hn_ids"].shape[:2] == (16, 2) and batch["hn_has_image"].shape == (16, 2)
    # A pair's own negatives come first (a random subset when it lists more); the rest are other pairs' positives,
    # never its own, and no candidate twice.
    example = pairs.PairExample([str(p) for p in sorted(pair_dir[0].glob("train-*"))], {}, {}, 56, 1.0, 2, "train-*")
    positives = {p.positive.id for p in pair_dir[1]}
    for key, pair in enumerate(pair_dir[1]):
        negs = example.hard_negatives(key, pair, np.random.default_rng(key))
        ids = [n.id for n in negs]
        assert len(ids) == len(set(ids)) == 2 and pair.positive.id not in ids
        own = [n.id for n in pair.negatives]
        assert ids[:len(own)] == own[:2] and set(ids[len(own):]) <= positives
    # Instructions are drawn per example from the pair's set: both appear over a few batches.
    seen = set()
    for _ in range(4):
        b = next(it)
        for k, ids in zip(b["example_id"], b["query_ids"]):
            if len(written[f"p{k}"].instruction_set) == 2:
                seen.add(tuple(ids))
    assert len(seen) > 2


def test_random_prompt_templates_are_drawn_per_example(pair_dir):
    from idmr_jax.tasks import build
    from idmr_jax.tasks.universal.prompts import load_prompt_set

    prompt_set = load_prompt_set("instructcir")
    assert len(prompt_set["query"]["image,text"]) == 3 and len(prompt_set["candidate"]["text"]) == 1
    cfg = _tiny(pair_dir, batch_size=8)
    task = build(cfg)
    example = pairs.PairExample(
        [str(p) for p in sorted(pair_dir[0].glob("train-*"))],
        {s: pairs.PromptTokenizer("", task.prompt_spec(s)) for s in ("query", "candidate")}, prompt_set, 56, 1.0, 0,
        "train-*")
    key = 2  # an image,text query
    prompts = {tuple(example.random_map(key, np.random.default_rng(seed))["query_ids"]) for seed in range(12)}
    assert len(prompts) >= 3  # three templates x the instruction drawn


# ------------------------------------------------------------------------------------------------ loss


def test_hard_negative_adds_its_hand_computed_share_to_the_loss():
    """Two unit queries, their positives and one hard negative each (every query sees both), temperature 1:
    without: each row is log(e + 1) - 1; with: log(e + 1 + e^0.6 + e^0.8) - 1 (row 1 sees 0.8 and 0.6)."""
    q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    hn = jnp.array([[[0.6, 0.8]], [[0.8, 0.6]]])
    without = float(infonce_dense(q, q, 1.0))
    with_hn = float(infonce_dense(q, q, 1.0, hard_negatives=hn))
    assert without == pytest.approx(math.log(math.e + 1) - 1, abs=1e-6)
    assert with_hn - without == pytest.approx(math.log((math.e + 1 + math.exp(0.6) + math.exp(0.8)) / (math.e + 1)),
                                              abs=1e-6)
    assert with_hn - without == pytest.approx(0.7365, abs=1e-4)  # 2.0886 x the denominator
    # The same on a 4x2 mesh, the batch sharded over all 8 devices (each device its own query and negative).
    mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
    rng = np.random.default_rng(0)
    qs = rng.normal(size=(8, 4)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    hns = rng.normal(size=(8, 1, 4)).astype(np.float32)
    shard = NamedSharding(mesh, P(("data", "fsdp")))
    f = jax.jit(lambda a, h: global_infonce(a, a, 0.5, mesh=mesh, hard_negatives=h))
    got = float(f(jax.device_put(qs, shard), jax.device_put(hns, shard)))
    z = qs @ qs.T / 0.5
    zh = qs @ hns[:, 0].T / 0.5
    expected = np.mean(np.log(np.exp(z).sum(1) + np.exp(zh).sum(1)) - np.diag(z))
    assert got == pytest.approx(float(expected), rel=1e-5)


def _batch_and_rows(task, n_hard: int = 1):
    """A packed batch of 16 pairs (every modality mixture) and each side's per-row pixels (the dense reference)."""
    d = task.config.data
    example = pairs.PairExample(
        [str(p) for p in sorted(Path(d.train_dir).glob("train-*"))],
        {s: pairs.PromptTokenizer("", task.prompt_spec(s)) for s in ("query", "candidate")},
        pairs.load_prompt_set(d.prompt_set), d.image_size, d.pad_ratio, n_hard, "train-*")
    rows = [example.random_map(k, np.random.default_rng(k)) for k in range(16)]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    row_pixels = {p: batch[f"{p}_pixels"] for p in pairs.SIDES}
    packed = pairs.PackImages(8, {p: int(d.image_slots[p]) for p in pairs.SIDES}).map(batch)
    return packed, row_pixels


def _dense_loss(model, batch, row_pixels, temp, direction):
    def embed(prefix):
        ids, mask = batch[f"{prefix}_ids"], batch[f"{prefix}_mask"]
        lead = ids.shape[:-1]
        ids, mask = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, ids.shape[-1])
        has = np.asarray(batch[f"{prefix}_has_image"]).reshape(-1)
        pix = np.asarray(row_pixels[prefix]).reshape(-1, *row_pixels[prefix].shape[-3:])
        out = [None] * len(has)
        for r in range(len(has)):  # one row at a time: text rows without pixels, image rows with their own
            e = model.embed(ids[r:r + 1], mask[r:r + 1], pix[r:r + 1] if has[r] else None)
            out[r] = e[0]
        return jnp.stack(out).reshape(*lead, -1)

    return infonce_dense(embed("query"), embed("cand"), temp, hard_negatives=embed("hn"), direction=direction)


@pytest.mark.slow
@pytest.mark.parametrize("gradcache_chunk", [0, 1])
def test_mixed_modality_loss_equals_dense_reference_on_a_4x2_mesh(pair_dir, gradcache_chunk, monkeypatch):
    """Mixed query / candidate / hard-negative modalities, a trainable vision tower: the task's loss on the 4x2 mesh
    (every device's candidates in every query's denominator) equals InfoNCE over embeddings computed row by row,
    value and gradients; with GradCache (a chunk per device) too. The vision tower sees only the packed slots."""
    from idmr_jax.models.llava import LlavaEmbedder
    from idmr_jax.tasks import build
    from idmr_jax.train.state import split_model

    cfg = _tiny(pair_dir, num_hard_negatives=1)
    cfg.model.freeze_vision = False
    cfg.model.lora.rank = 0
    cfg.loss.gradcache_chunk = gradcache_chunk
    cfg.loss.direction = "symmetric"
    task = build(cfg)
    assert not task.vision_frozen
    batch, row_pixels = _batch_and_rows(task)
    mesh = make_mesh(dict(cfg.sharding.mesh))
    shard = NamedSharding(mesh, P(("data", "fsdp")))
    on_mesh = {k: jax.device_put(v, shard) for k, v in batch.items() if k != "example_id"}
    graphdef, params, frozen = split_model(task.build_model(), task.frozen_patterns)
    rng = jax.random.key_data(jax.random.key(0))
    seen = []
    original = LlavaEmbedder.vision_features
    monkeypatch.setattr(LlavaEmbedder, "vision_features", lambda self, px: seen.append(px.shape[0]) or original(
        self, px))
    loss_fn = task.bind_mesh(mesh)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, frozen), on_mesh, rng)[0]))(
        params)
    # Without GradCache the tower runs once per side on its 16 slots; under GradCache inside each chunk's rows.
    if gradcache_chunk == 0:
        assert seen == [16, 16, 16]
    monkeypatch.setattr(LlavaEmbedder, "vision_features", original)

    def dense(p):
        return _dense_loss(nnx.merge(graphdef, p, frozen), batch, row_pixels, cfg.loss.temperature, "symmetric")

    ref_value, ref_grads = jax.value_and_grad(dense)(params)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    flat, ref_flat = nnx.to_flat_state(grads), dict(nnx.to_flat_state(ref_grads))
    vision_norm = 0.0
    for path, g in flat:
        g, r = np.asarray(g.get_value()), np.asarray(ref_flat[path].get_value())
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * max(float(np.abs(r).max()), 1e-3), err_msg=str(path))
        if str(path[0]) == "vision":
            vision_norm += float(np.abs(g).sum())
    assert vision_norm > 0  # the image rows do train the tower


@pytest.mark.slow
def test_text_rows_and_empty_slots_never_reach_the_vision_tower(pair_dir, monkeypatch):
    """Noise in the unused image slots and in text rows' places changes nothing (loss and every gradient equal
    bit for bit); a text-only side (slots 0) never calls the tower, and an all-text batch leaves its gradient 0."""
    from idmr_jax.models.llava import LlavaEmbedder
    from idmr_jax.tasks import build
    from idmr_jax.train.state import split_model

    cfg = _tiny(pair_dir, num_hard_negatives=1)
    cfg.model.freeze_vision, cfg.model.lora.rank, cfg.loss.gradcache_chunk = False, 0, 0
    task = build(cfg)
    batch, _ = _batch_and_rows(task)
    mesh = make_mesh(dict(cfg.sharding.mesh))
    shard = NamedSharding(mesh, P(("data", "fsdp")))
    graphdef, params, frozen = split_model(task.build_model(), task.frozen_patterns)
    rng = jax.random.key_data(jax.random.key(0))
    loss_fn = jax.jit(jax.value_and_grad(
        lambda p, b: task.bind_mesh(mesh)(nnx.merge(graphdef, p, frozen), b, rng)[0]))

    def run(b):
        return loss_fn(params, {k: jax.device_put(v, shard) for k, v in b.items() if k != "example_id"})

    noisy = dict(batch)
    for prefix in pairs.SIDES:
        has = batch[f"{prefix}_has_image"].reshape(8, -1)
        used = np.zeros((8, batch[f"{prefix}_pixels"].shape[0] // 8), bool)
        for j in range(8):
            used[j, :has[j].sum()] = True
        noise = np.random.default_rng(1).normal(size=batch[f"{prefix}_pixels"].shape).astype(np.float32)
        noisy[f"{prefix}_pixels"] = np.where(used.reshape(-1)[:, None, None, None], batch[f"{prefix}_pixels"], noise)
        assert not used.all()  # some slots are free: the mixture leaves room
    (v1, g1), (v2, g2) = run(batch), run(noisy)
    assert float(v1) == float(v2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # All text: no pixels at all, the tower is never called and gets exactly zero gradient.
    text_only = {k: v for k, v in batch.items() if not k.endswith("_pixels")}
    for prefix in pairs.SIDES:
        text_only[f"{prefix}_has_image"] = np.zeros_like(batch[f"{prefix}_has_image"])
        text_only[f"{prefix}_ids"] = np.where(batch[f"{prefix}_ids"] == cfg.model.image_token_id, 0,
                                              batch[f"{prefix}_ids"])
    calls = []
    original = LlavaEmbedder.vision_features
    monkeypatch.setattr(LlavaEmbedder, "vision_features", lambda self, px: calls.append(1) or original(self, px))
    loss_text = jax.jit(jax.value_and_grad(
        lambda p, b: task.bind_mesh(mesh)(nnx.merge(graphdef, p, frozen), b, rng)[0]))
    value, grads = loss_text(params, {k: jax.device_put(v, shard) for k, v in text_only.items()
                                      if k != "example_id"})
    assert calls == [] and np.isfinite(float(value))
    vision = [np.asarray(g.get_value()) for path, g in nnx.to_flat_state(grads) if str(path[0]) == "vision"]
    assert vision and all(not g.any() for g in vision)


def test_an_idmr_workdir_from_before_the_universal_task_resumes():
    """A config saved before ``data.format`` / ``prompt_set`` / ``image_slots`` existed means IDMR triplets with a
    slot per row: resuming it under today's configs/idmr.py changes nothing, training it on pairs does."""
    from idmr_jax.train.resume import changed_fields

    current = sibling_config(str(ROOT / "configs" / "idmr.py"), "idmr.py").get_config("tiny").to_dict()
    saved = {**current, "data": {k: v for k, v in current["data"].items()
                                 if k not in ("format", "prompt_set", "image_slots")}}
    assert changed_fields(saved, current) == []
    pairs_now = {**current, "data": {**current["data"], "format": "pairs"}}
    assert changed_fields(saved, pairs_now) == [("data.format", "triplets", "pairs")]
