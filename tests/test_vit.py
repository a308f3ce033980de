"""ViT port: parity with transformers' Blip2VisionModel / CLIPVisionModel, weight maps, scan/remat/dtype, sharding."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel

import idmr_jax  # noqa: F401  (sets flax config)
from idmr_jax import sharding
from idmr_jax.models.vit import VisionTransformer, patch_grid, vit_config
from idmr_jax.weights import mapping
from idmr_jax.weights.mapping import NameMap, WeightMismatchError
from idmr_jax.weights import vit as vit_weights

TOL = 1e-4
_IGNORE_LN_VISION = [r"post_layernorm\..*"]  # BLIP-2's ln_vision lives in the BLIP-2 assembly


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter off its (often zero / one) init so that each one matters for the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "embedding" in name and "patch" not in name else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _pixels(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((b, h, w, 3)).astype(np.float32)


def _to_torch(px: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(px.transpose(0, 3, 1, 2).copy())


def _load(cfg, flat) -> VisionTransformer:
    """Builds the model abstractly (no random init: eager init compiles many tiny programs) and loads `flat`."""
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(1)))
    mapping.load_into(model, flat)
    return model


@nnx.jit
def _fwd(model: VisionTransformer, pixels: jax.Array):
    """Jitted forward: one compile per config instead of op-by-op dispatch (much faster on CPU)."""
    return model(pixels)


def _np(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(_np(a).astype(np.float32) - _np(b).astype(np.float32))))


@pytest.fixture(scope="module")
def eva():
    """A tiny random Blip2VisionModel, its state dict and the matching converted flax params."""
    cfg = vit_config("eva-tiny")
    torch.manual_seed(0)
    hf = Blip2VisionModel(vit_weights.hf_vision_config(cfg)).eval()
    _randomise(hf, 0)
    sd = _state_dict(hf)
    flat = NameMap(vit_weights.hf_blip2_vision_rules(cfg)).torch_to_flax(sd, ignore=_IGNORE_LN_VISION)
    return cfg, hf, sd, flat


@pytest.fixture(scope="module")
def clip():
    cfg = vit_config("clip-tiny")
    torch.manual_seed(0)
    hf = CLIPVisionModel(vit_weights.hf_vision_config(cfg)).eval()
    _randomise(hf, 1)
    sd = _state_dict(hf)
    flat = NameMap(vit_weights.hf_clip_vision_rules(cfg)).torch_to_flax(sd)
    return cfg, hf, sd, flat


# ----------------------------------------------------------------------------------------------
# Parity with transformers.


@pytest.mark.parametrize("hw", [(56, 56), (42, 70)])  # native 4x4 grid; and 3x5 (interpolated positions)
def test_eva_matches_hf_blip2_vision(eva, hw):
    cfg, hf, _, flat = eva
    px = _pixels(2, *hw)
    model = _load(cfg, flat)
    out = _fwd(model, jnp.asarray(px))
    with torch.no_grad():
        ref = hf(_to_torch(px), output_hidden_states=True, interpolate_pos_encoding=hw != (56, 56))
    assert out.grid == (hw[0] // 14, hw[1] // 14)
    assert out.pooled is None
    assert out.tokens.shape == (2, 1 + out.grid[0] * out.grid[1], cfg.width)
    # hidden_states[-1] is the encoder output before post_layernorm (= BLIP-2's ln_vision).
    assert _maxdiff(out.tokens, ref.hidden_states[-1]) <= TOL


@pytest.mark.parametrize("hw", [(56, 56), (56, 84)])
def test_clip_matches_hf_clip_vision(clip, hw):
    cfg, hf, _, flat = clip
    px = _pixels(2, *hw, seed=1)
    model = _load(cfg, flat)
    out = _fwd(model, jnp.asarray(px))
    with torch.no_grad():
        ref = hf(_to_torch(px), interpolate_pos_encoding=hw != (56, 56))
    assert out.grid == (hw[0] // 14, hw[1] // 14)
    assert _maxdiff(out.tokens, ref.last_hidden_state) <= TOL
    assert _maxdiff(out.pooled, ref.pooler_output) <= TOL


def test_grid_for_other_sizes(clip):
    cfg, _, _, flat = clip
    model = _load(cfg, flat)
    out = _fwd(model, jnp.zeros((1, 30, 75, 3)))  # trailing pixels that fill no patch are dropped, as by the conv
    assert out.grid == patch_grid(cfg, 30, 75) == (2, 5)
    assert out.tokens.shape == (1, 11, cfg.width)


# ----------------------------------------------------------------------------------------------
# Execution options.


def test_scan_matches_unscanned(eva):
    cfg, _, _, flat = eva
    px = jnp.asarray(_pixels(2, 56, 56))
    plain = _load(cfg, flat)
    scanned = _load(dataclasses.replace(cfg, scan=True), flat)  # load_into stacks encoder/layers/{i}/...
    assert mapping.flatten_params(scanned)["encoder/layers/attn/qkv/kernel"].shape == (2, 64, 3, 4, 16)
    # Same per-layer computation, so the same bits on CPU (the loop is unrolled by XLA either way).
    np.testing.assert_array_equal(np.asarray(_fwd(plain, px).tokens), np.asarray(_fwd(scanned, px).tokens))


def test_remat_and_scan_same_outputs_and_grads(clip):
    """Rematerialisation (and scanning) change memory/compute, never values: loss and every gradient agree."""
    cfg, _, _, flat = clip
    px = jnp.asarray(_pixels(2, 56, 56, seed=2))

    @nnx.jit
    def value_and_grads(model):
        def loss(m):
            out = m(px)
            return jnp.sum(out.tokens ** 2) + jnp.sum(out.pooled ** 2)

        return nnx.value_and_grad(loss)(model)

    ref_value, ref_grads = value_and_grads(_load(cfg, flat))
    ref_grads = mapping.flatten_params(ref_grads)
    for scan, remat in ((False, "full"), (True, "dots")):
        value, grads = value_and_grads(_load(dataclasses.replace(cfg, scan=scan, remat=remat), flat))
        grads = mapping.flatten_params(grads)
        expected = mapping.stack_for_model(ref_grads, grads)  # per-layer -> stacked layout when scanned
        assert abs(float(value) - float(ref_value)) <= 1e-5 * abs(float(ref_value))
        for k in expected:
            assert _maxdiff(grads[k], expected[k]) <= 1e-5 * (1 + float(np.max(np.abs(expected[k])))), (scan, k)


def test_bf16_compute_close_to_f32(eva):
    """bf16 compute with f32 params: LayerNorm statistics and softmax stay f32; the relative error of the
    tokens stays under 2% of their largest magnitude for this 2-layer model (bf16 has an 8-bit mantissa)."""
    cfg, _, _, flat = eva
    px = jnp.asarray(_pixels(2, 56, 56))
    ref = _fwd(_load(cfg, flat), px).tokens
    model = _load(dataclasses.replace(cfg, dtype="bfloat16"), flat)
    assert mapping.flatten_params(model)["encoder/layers/0/mlp/fc1/kernel"].dtype == jnp.float32
    out = _fwd(model, px).tokens
    assert out.dtype == jnp.bfloat16
    rel = _maxdiff(out, ref) / float(jnp.max(jnp.abs(ref)))
    assert rel <= 2e-2, rel


# ----------------------------------------------------------------------------------------------
# Weight maps.


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_hf_bit_exact(eva, clip, scan):
    for (cfg, _, sd, flat), rules, ignore in ((eva, vit_weights.hf_blip2_vision_rules, _IGNORE_LN_VISION),
                                              (clip, vit_weights.hf_clip_vision_rules, ())):
        cfg = dataclasses.replace(cfg, scan=scan)
        name_map = NameMap(rules(cfg))
        model = _load(cfg, flat)
        back = name_map.flax_to_torch(mapping.unstack_from_model(mapping.flatten_params(model), name_map))
        expected = {k: v for k, v in sd.items() if not k.startswith("post_layernorm.") or not ignore}
        assert set(back) == set(expected)
        for k, v in expected.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_lavis_names_and_round_trip(eva):
    """HF Blip2 weights exported under LAVIS EVA names and read back: names as in LAVIS eva_vit.py, bit-exact."""
    cfg, _, _, flat = eva
    flat = dict(flat)
    for i in range(cfg.depth):  # LAVIS has no k bias; real checkpoints have a zero k third
        b = flat[f"encoder/layers/{i}/attn/qkv/bias"].copy()
        b[1] = 0
        flat[f"encoder/layers/{i}/attn/qkv/bias"] = b
    lavis_map = NameMap(vit_weights.lavis_eva_rules(cfg))
    lavis_sd = vit_weights.split_lavis_qkv_bias(lavis_map.flax_to_torch(flat))
    expected = {"cls_token": (1, 1, 64), "pos_embed": (1, 17, 64), "patch_embed.proj.weight": (64, 3, 14, 14),
                "patch_embed.proj.bias": (64,)}
    for i in range(cfg.depth):
        expected |= {
            f"blocks.{i}.norm1.weight": (64,), f"blocks.{i}.norm1.bias": (64,),
            f"blocks.{i}.attn.qkv.weight": (192, 64), f"blocks.{i}.attn.q_bias": (64,),
            f"blocks.{i}.attn.v_bias": (64,), f"blocks.{i}.attn.proj.weight": (64, 64),
            f"blocks.{i}.attn.proj.bias": (64,), f"blocks.{i}.norm2.weight": (64,), f"blocks.{i}.norm2.bias": (64,),
            f"blocks.{i}.mlp.fc1.weight": (128, 64), f"blocks.{i}.mlp.fc1.bias": (128,),
            f"blocks.{i}.mlp.fc2.weight": (64, 128), f"blocks.{i}.mlp.fc2.bias": (64,),
        }
    assert {k: v.shape for k, v in lavis_sd.items()} == expected
    # Prefixed, as inside a LAVIS BLIP-2 state dict.
    prefixed = {f"visual_encoder.{k}": v for k, v in lavis_sd.items()} | {"ln_vision.weight": np.ones(64)}
    fused = vit_weights.fuse_lavis_qv_bias(prefixed, prefix="visual_encoder.")
    back = NameMap(mapping.prefixed(vit_weights.lavis_eva_rules(cfg), "visual_encoder.")).torch_to_flax(
        fused, ignore=[r"ln_vision\..*"])
    assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
    # A nonzero k bias cannot be written to LAVIS silently.
    flat["encoder/layers/0/attn/qkv/bias"][1, 0, 0] = 1.0
    with pytest.raises(WeightMismatchError, match=r"blocks\.0\.attn\.qkv\.bias"):
        vit_weights.split_lavis_qkv_bias(lavis_map.flax_to_torch(flat))
    with pytest.raises(WeightMismatchError, match=r"blocks\.1\.attn\.q_bias"):
        vit_weights.fuse_lavis_qv_bias({k: v for k, v in lavis_sd.items() if k != "blocks.1.attn.v_bias"})


def test_strict_conversion_names_the_tensor(eva):
    cfg, _, sd, flat = eva
    name_map = NameMap(vit_weights.hf_blip2_vision_rules(cfg))
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(WeightMismatchError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        name_map.torch_to_flax(missing, ignore=_IGNORE_LN_VISION)
    extra = dict(sd, **{"encoder.layers.2.mlp.fc2.bias": np.zeros(64, np.float32)})
    with pytest.raises(WeightMismatchError, match=r"encoder\.layers\.2\.mlp\.fc2\.bias"):
        name_map.torch_to_flax(extra, ignore=_IGNORE_LN_VISION)
    # A transposed qkv weight has the right size but the wrong layout: refused, naming the tensor.
    bad = dict(sd, **{"encoder.layers.0.self_attn.qkv.weight": sd["encoder.layers.0.self_attn.qkv.weight"].T})
    with pytest.raises(WeightMismatchError, match=r"encoder\.layers\.0\.self_attn\.qkv\.weight"):
        name_map.torch_to_flax(bad, ignore=_IGNORE_LN_VISION)
    # A model with one layer fewer does not silently take the checkpoint.
    with pytest.raises(WeightMismatchError, match=r"encoder/layers/1/"):
        _load(dataclasses.replace(cfg, depth=1), flat)


def test_real_size_eva_g_names_and_shapes():
    """eva-g/14 matches transformers' Blip2VisionConfig defaults, and its name map fits the real-size shapes
    (2 of the 39 layers, built abstractly / on torch's meta device)."""
    cfg = vit_config("eva-g/14")
    assert cfg == vit_weights.vit_config_from_hf(Blip2VisionConfig())
    small = dataclasses.replace(cfg, depth=2, scan=True)
    with torch.device("meta"):
        hf = Blip2VisionModel(Blip2VisionConfig(num_hidden_layers=2))
    sd = {k: np.empty(tuple(v.shape), np.float32) for k, v in hf.state_dict().items()}
    flat = NameMap(vit_weights.hf_blip2_vision_rules(small)).torch_to_flax(sd, ignore=_IGNORE_LN_VISION)
    abstract = nnx.eval_shape(lambda: VisionTransformer(small, rngs=nnx.Rngs(0)))
    mapping.stack_for_model(flat, mapping.flatten_params(abstract))  # checks every name and shape
    total = sum(int(np.prod(v.shape)) for v in mapping.flatten_params(
        nnx.eval_shape(lambda: VisionTransformer(dataclasses.replace(cfg, scan=True), rngs=nnx.Rngs(0)))).values())
    with torch.device("meta"):
        full = Blip2VisionModel(Blip2VisionConfig())
    hf_total = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("post_layernorm."))
    assert total == hf_total == 985_949_440  # EVA ViT-g/14, 39 blocks, without ln_vision


def test_configs_round_trip_through_hf():
    for variant in ("eva-g/14", "L/14", "B/16", "eva-tiny", "clip-tiny"):
        cfg = vit_config(variant)
        assert vit_weights.vit_config_from_hf(vit_weights.hf_vision_config(cfg)) == cfg
    assert vit_config("L/14") == vit_weights.vit_config_from_hf(
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         patch_size=14))
    assert vit_weights.vit_config_from_hf(Blip2VisionConfig(), scan=True).scan


# ----------------------------------------------------------------------------------------------
# Sharding.


def test_sharded_init_follows_logical_rules(clip):
    cfg, _, _, flat = clip
    cfg = dataclasses.replace(cfg, scan=True)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 4})
    rules = sharding.DEFAULT_RULES
    model = sharding.sharded_init(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    params = mapping.flatten_params(model)
    assert params["encoder/layers/mlp/fc1/kernel"].sharding.spec == P(None, "fsdp", "model")
    assert params["encoder/layers/attn/query/kernel"].sharding.spec == P(None, "fsdp", "model", None)
    assert params["encoder/layers/attn/out/kernel"].sharding.spec == P(None, "model", None, "fsdp")
    assert params["embeddings/patch_embed/kernel"].sharding.spec == P(None, None, None, "fsdp")
    # Initialisation: trunc-normal(0.02) kernels, zero biases, unit LayerNorm scales.
    assert 0.015 < float(jnp.std(params["encoder/layers/mlp/fc1/kernel"])) < 0.025
    assert not np.any(np.asarray(params["encoder/layers/mlp/fc1/bias"]))
    assert np.all(np.asarray(params["encoder/layers/norm1/scale"]) == 1)
    # Load real weights into the sharded layout and run under the rules (constrain active): same outputs.
    state = nnx.state(model, nnx.Param)
    shardings = sharding.state_shardings(state, mesh, rules)
    ref = _load(cfg, flat)
    nnx.update(model, jax.device_put(nnx.state(ref, nnx.Param), shardings))
    px = jnp.asarray(_pixels(2, 56, 56))

    @nnx.jit
    def run(m, x):
        with sharding.axis_rules(mesh, rules):
            return m(x).tokens

    out = run(model, px)
    assert _maxdiff(out, _fwd(ref, px).tokens) <= 1e-5
