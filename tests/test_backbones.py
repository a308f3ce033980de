"""The InternVL and Qwen2-VL backbones in the shared embedder trainer (configs/idmr.py:tiny,backbone=NAME): the task's
loss on a 4x2 mesh, through GradCache with a trainable vision tower, equals InfoNCE over each row's own `embed`
(value and gradients), and the shared trainer takes optimiser steps that move every trained part."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idmr_jax.config_args import sibling_config
from idmr_jax.losses.contrastive import infonce_dense
from idmr_jax.sharding import make_mesh

BACKBONES = ("internvl", "qwen2vl")


def _config(backbone: str):
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = sibling_config(str(configs / "idmr.py"), "idmr.py").get_config(f"tiny,backbone={backbone}")
    cfg.sharding.mesh = dict(data=4, fsdp=2, model=1)
    cfg.model.freeze_vision = False
    cfg.data.num_hard_negatives = 1
    return cfg


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_config_builds_its_own_model(backbone):
    from idmr_jax import tasks
    from idmr_jax.tasks.idmr.task import IdmrTask

    cfg = _config(backbone)
    kind, model_cfg = tasks.model_config_of(cfg)
    assert kind == backbone and model_cfg.tokens_per_image(cfg.data.image_size) == 4
    model = IdmrTask(cfg).build_model()
    assert type(model).__name__ == {"internvl": "InternVLEmbedder", "qwen2vl": "Qwen2VLEmbedder"}[backbone]
    paths = {str(p[0]) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {"vision", "projector", "lm"}
    with pytest.raises(ValueError, match="not a .* checkpoint"):
        cfg.model.init.format, cfg.model.init.path = "hf_llava", "/nowhere"
        IdmrTask(cfg).load_pretrained(None, None)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_loss_on_a_4x2_mesh_equals_the_dense_reference_and_the_trainer_steps(backbone, tmp_path):
    from idmr_jax.tasks.idmr.task import IdmrTask
    from idmr_jax.train import trainer
    from idmr_jax.train.state import split_model
    from idmr_jax.weights.workdir import restore

    cfg = _config(backbone)
    task = IdmrTask(cfg)
    assert not task.vision_frozen and cfg.loss.gradcache_chunk == 1
    batch = next(task.train_iterator())
    mesh = make_mesh(dict(cfg.sharding.mesh))
    on_mesh = {k: jax.device_put(v, NamedSharding(mesh, P(("data", "fsdp")))) for k, v in batch.items()}
    graphdef, params, frozen = split_model(task.build_model(), task.frozen_patterns)
    rng = jax.random.key_data(jax.random.key(0))
    loss_fn = task.bind_mesh(mesh)
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, frozen), on_mesh, rng)[0]))(
        params)
    length, size = batch["query_ids"].shape[-1], cfg.data.image_size

    def dense(p):
        model = nnx.merge(graphdef, p, frozen)

        def emb(side):
            return model.embed(batch[f"{side}_ids"].reshape(-1, length), batch[f"{side}_mask"].reshape(-1, length),
                               batch[f"{side}_pixels"].reshape(-1, size, size, 3))

        return infonce_dense(emb("query"), emb("cand"), cfg.loss.temperature, hard_negatives=emb("hn")[:, None])

    ref_value, ref_grads = jax.jit(jax.value_and_grad(dense))(params)  # one program, not op by op: faster
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5)
    ref = dict(nnx.to_flat_state(ref_grads))
    parts = set()
    for path, g in nnx.to_flat_state(grads):
        g, r = np.asarray(g.get_value()), np.asarray(ref[path].get_value())
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5 * max(float(np.abs(r).max()), 1e-3), err_msg=str(path))
        if np.abs(g).sum() > 0:
            parts.add(str(path[0]))
    assert parts == {"vision", "projector", "lm"}

    # Two optimiser steps through the shared trainer on the same mesh: finite losses, every part moved.
    cfg.train.num_steps, cfg.train.log_every, cfg.train.checkpoint_every = 2, 1, 2
    cfg.train.progress, cfg.train.async_checkpoints, cfg.eval.at_end = False, False, False
    trainer.train_and_evaluate(IdmrTask(cfg), tmp_path)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) == 2 and np.isfinite(losses).all()
    trained = restore(tmp_path).flat
    start = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
    moved = {k.split("/")[0] for k, v in start.items() if not np.array_equal(np.asarray(trained[k]), v)}
    assert moved == {"vision", "projector", "lm"}


def test_internvl_renormalises_the_pipelines_clip_pixels():
    """The pipelines normalise with CLIP's statistics; the InternVL embedder the task builds turns them into the
    ImageNet-normalised pixels its tower was trained on, so both give the same features (and the step matters)."""
    import dataclasses

    from idmr_jax.data.image_ops import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
    from idmr_jax.tasks.idmr.task import IdmrTask

    model = IdmrTask(_config("internvl")).build_model()
    assert model.cfg.input_mean == CLIP_MEAN and model.cfg.input_std == CLIP_STD
    raw = np.random.default_rng(0).uniform(0, 1, (2, 56, 56, 3)).astype(np.float32)
    clip = (raw - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    imagenet = (raw - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    given_clip = np.asarray(model.vision_features(clip))
    model.cfg = dataclasses.replace(model.cfg, input_mean=None, input_std=None)  # the reference's convention
    reference = np.asarray(model.vision_features(imagenet))
    np.testing.assert_allclose(given_clip, reference, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(model.vision_features(clip)) - reference).max() > 1e-2
