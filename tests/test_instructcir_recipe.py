"""InstructCIR's two stages through the stage runner on a tiny random embedder and the tiny demo data: both stages
train and evaluate, their metrics land side by side, and stage 2 starts from stage 1's weights bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from idmr_jax.config_args import sibling_config

ROOT = Path(__file__).resolve().parents[1]


def _config(arg):
    """configs/instructcir.py:ARG, loaded by path as ml_collections loads config files."""
    return sibling_config(str(ROOT / "configs" / "instructcir.py"), "instructcir.py").get_config(arg)


def test_stage_configs_follow_the_recipe():
    from idmr_jax.train.stages import PREVIOUS_STAGE, stage_config

    cfg = _config("")
    cfg.data.caption_dir, cfg.data.triplet_dir = "/data/captions", "/data/triplets"
    (n1, o1), (n2, o2) = cfg.stages
    s1, s2 = stage_config(cfg, o1, None), stage_config(cfg, o2, "/w/stage1")
    assert (n1, n2) == ("stage1", "stage2") and "stages" not in s1
    assert s1.loss.direction == "symmetric" and s1.data.num_hard_negatives == 0 and s1.model.lora.rank == 0
    assert not s1.model.freeze_vision and s1.model.train_projector and s1.data.train_dir == "/data/captions"
    assert s2.loss.direction == "q2t" and s2.data.num_hard_negatives == 1 and s2.data.train_dir == "/data/triplets"
    assert (s2.model.lora.rank, s2.model.lora.alpha) == (64, 16.0) and s2.model.freeze_vision
    assert not s2.model.train_projector and (s2.model.init.format, s2.model.init.path) == ("workdir", "/w/stage1")
    assert s1.loss.temperature == s2.loss.temperature == 0.05
    assert (s1.data.image_slots.cand, s2.data.image_slots.hn) == (0, 0)  # captions hold no image
    full = _config("full")
    assert stage_config(full, full.stages[1][1], "/w").model.lora.rank == 0
    with pytest.raises(ValueError, match="previous stage"):
        stage_config(cfg, [("model.init.path", PREVIOUS_STAGE)], None)
    with pytest.raises(ValueError, match="no such field"):
        stage_config(cfg, [("loss.temprature", 1.0)], None)
    one = _config("stage=2")
    assert "stages" not in one and one.model.init.path == "" and one.model.init.format == "workdir"


@pytest.mark.slow
def test_two_stages_train_evaluate_and_carry_the_weights_bit_exactly(tmp_path):
    from idmr_jax import tasks
    from idmr_jax.train import stages, trainer
    from idmr_jax.weights.workdir import restore

    cfg = _config("tiny")
    cfg.data.source, cfg.data.demo_size, cfg.data.demo_cache = "demo", "tiny", str(tmp_path / "cache")
    cfg.train.num_steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 2, 1
    cfg.train.async_checkpoints, cfg.train.progress = False, False

    def run_one(config, workdir):
        return trainer.train_and_evaluate(tasks.build(tasks.prepare_data(config)), workdir)

    work = tmp_path / "w"
    results = stages.run_stages(cfg, str(work), run_one)
    assert json.loads((work / "metrics.json").read_text()) == pytest.approx(results)
    for stage in ("stage1", "stage2"):
        metrics = json.loads((work / stage / "eval" / "demo_cir" / "metrics.json").read_text())
        assert {f"{stage}/{k}": v for k, v in metrics.items()} == pytest.approx(
            {k: v for k, v in results.items() if k.startswith(stage)})
        assert f"{stage}/demo_cir/R@1" in results
    first, second = restore(work / "stage1").flat, restore(work / "stage2").flat
    # Stage 2 trains LoRA factors only: every stage-1 parameter is carried over (and kept) bit for bit.
    assert set(first) < set(second) and all("lora" in k for k in set(second) - set(first))
    for key, value in first.items():
        np.testing.assert_array_equal(np.asarray(second[key]), np.asarray(value), err_msg=key)
    # Stage 1 did train (its LM moved away from the random init the seed gives).
    init = tasks.build(stages.stage_config(cfg, cfg.stages[0][1], None)).build_model()
    from flax import nnx

    start = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(init, nnx.Param))}
    assert any(not np.array_equal(start[k], first[k]) for k in first if k.startswith("lm/") and k in start)
