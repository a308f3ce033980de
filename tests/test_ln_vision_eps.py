"""ln_vision's epsilon follows where the weights come from: LAVIS / AdaFocal (torch's default LayerNorm, 1e-5)
unless they come from transformers' Blip2ForImageTextRetrieval (post_layernorm with the ViT's eps, 1e-6 for EVA);
the laptop demo's EfficientNet keeps 1e-6 (its published numbers)."""

import pytest
from flax import nnx

from configs import oacir
from idmr_jax.models.adafocal import AdaFocal
from idmr_jax.models.blip2 import LAVIS_LN_VISION_EPS, ln_vision_eps_for
from idmr_jax.tasks.oacir.task import model_config


def _built_eps(cfg) -> float:
    """The epsilon the built model's ln_vision really uses (abstract build: nothing is allocated)."""
    return nnx.eval_shape(lambda: AdaFocal(cfg, rngs=nnx.Rngs(0))).blip2.ln_vision.eps


@pytest.mark.parametrize("fmt, eps", [("", 1e-5), ("lavis_blip2", 1e-5), ("lavis_adafocal", 1e-5), ("bert", 1e-5),
                                      ("hf_blip2", 1e-6)])
@pytest.mark.parametrize("arg", ["", "tiny"])
def test_ln_vision_eps_per_init_format(arg, fmt, eps):
    config = oacir.get_config(arg)
    config.model.init.format = fmt
    cfg = model_config(config)
    assert cfg.blip2.ln_vision_eps == (None if fmt == "hf_blip2" else LAVIS_LN_VISION_EPS)
    if arg == "tiny":  # building the full-size model abstractly is slow for a parametrised test
        assert _built_eps(cfg) == eps


def test_demo_keeps_its_eps():
    cfg = model_config(oacir.get_config("demo"))
    assert cfg.blip2.ln_vision_eps is None and _built_eps(cfg) == 1e-6
    assert ln_vision_eps_for("bert", cfg.blip2.vision) is None
