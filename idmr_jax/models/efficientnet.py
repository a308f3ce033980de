"""EfficientNet-Lite (Flax NNX, NHWC, inference-mode BatchNorm) and a ViT-compatible patch-feature encoder.

Architecture (EfficientNet, arXiv:1905.11946; the Lite variants of tensorflow/tpu `models/official/efficientnet/lite`):
stem 3x3/2 conv (32 ch) -> 7 stages of MBConv blocks (1x1 expand -> kxk depthwise -> 1x1 project, no
squeeze-excitation, ReLU6, identity skip when stride 1 and in == out) -> 1x1 head conv (1280 ch) -> global average
pool -> linear classifier. Every conv is bias-free and followed by BatchNorm (epsilon 1e-3). Convs use TensorFlow
"SAME" padding (``lax`` 'SAME': the odd padding pixel goes bottom/right), as the weights were trained in TensorFlow.

Inputs of :class:`EfficientNetLite` are already normalised with the training statistics: the Lite models were
trained on ``(pixel_255 - 127) / 128`` ("inception-style" mean/std, chosen for post-quantisation; `MEAN_RGB` /
`STDDEV_RGB` in the TF `efficientnet_lite_builder.py`). :class:`EfficientNetPatchEncoder` takes pixels normalised
for the rest of the pipeline (CLIP statistics by default) and re-normalises them itself.

BatchNorm always uses its running statistics (the model is a frozen feature extractor). The stored params keep
the checkpoint's layout (kernel, scale, bias, mean, var) and convert strictly in both directions; ``fold_bn=True``
folds the BN affine into the conv kernels inside the forward pass instead. It is off by default: on XLA:CPU the
per-channel affine already fuses into the conv's output loop, and re-scaling the kernels on every call made the
Lite0 forward slower (94 vs 69 ms for 4 images at 224 px on 2 cores).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idmr_jax.models.vit import VisionOutput  # the shared vision-encoder output (grid is static under jit)
from idmr_jax.sharding import constrain

# EfficientNet-Lite0, per stage: (repeats, kernel, stride, expand_ratio, out_channels).
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)
# Training normalisation of the Lite weights, in [0, 1] pixel units: (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# OpenAI CLIP normalisation, used by the rest of the demo pipeline.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
    """EfficientNet-Lite architecture. ``head_width=0`` drops the head conv, ``num_classes=0`` the classifier.

    `stages` may be a prefix of :data:`LITE0_STAGES` to build a truncated backbone (e.g. up to stride 16).
    """

    stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES
    stem_width: int = 32
    head_width: int = 1280
    num_classes: int = 1000
    bn_eps: float = 1e-3
    fold_bn: bool = False
    depthwise_impl: str = "shifts"  # "shifts" (fast on CPU, see _depthwise_shifts) | "conv" (lax grouped conv)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Cumulative stride (w.r.t. the input) at the end of each stage."""
        out, s = [], 2  # the stem has stride 2
        for _, _, stride, _, _ in self.stages:
            s *= stride
            out.append(s)
        return tuple(out)


def efficientnet_lite0_config(**overrides) -> EfficientNetLiteConfig:
    """The ImageNet EfficientNet-Lite0 configuration (4.65M params), with optional field overrides."""
    return EfficientNetLiteConfig(**overrides)


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding: output ceil(size / stride), the odd pixel of padding after (bottom/right)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _depthwise_shifts(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise 'SAME' conv as a sum of kh*kw strided shifted slices times per-channel taps.

    XLA fuses this into one elementwise loop; XLA:CPU lowers a grouped conv with groups == channels 10-30x
    slower (measured on the Lite0 layer shapes), which dominated the whole forward pass.
    """
    kh, kw = kernel.shape[:2]
    b, h, w, c = x.shape
    (pt, pb), (pl, pr) = _same_pads(h, kh, stride), _same_pads(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh, ow = -(-h // stride), -(-w // stride)
    # The taps accumulate in float32, as a matmul's products do (a bf16 sum of 25 taps would round 25 times).
    kernel32 = kernel.astype(jnp.float32)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c),
                                (1, stride, stride, 1)).astype(jnp.float32) * kernel32[i, j, 0]
            out = tap if out is None else out + tap
    return out.astype(x.dtype)


class ConvBN(nnx.Module):
    """Bias-free 'SAME' conv followed by inference-mode BatchNorm, optionally folded into the conv.

    Params: ``kernel`` [kh, kw, in/groups, out], BN ``scale``/``bias`` (nnx.Param) and running ``mean``/``var``
    (nnx.BatchStat, never updated: the encoder is frozen).
    """

    def __init__(self, cin: int, cout: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 cfg: EfficientNetLiteConfig, rngs: nnx.Rngs):
        self.stride, self.groups, self.eps, self.fold = stride, groups, cfg.bn_eps, cfg.fold_bn
        self.depthwise_impl = cfg.depthwise_impl
        self.dtype = jnp.dtype(cfg.dtype)
        pdt = jnp.dtype(cfg.param_dtype)
        # He-normal fan-out init as in the TF reference; only matters for random-init tests.
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(nnx.with_partitioning(init, (None, None, "channels", "channels"))(
            rngs.params(), (kernel, kernel, cin // groups, cout), pdt))
        vec = lambda fn: nnx.with_partitioning(fn, ("channels",))(rngs.params(), (cout,), pdt)  # noqa: E731
        self.scale = nnx.Param(vec(nnx.initializers.ones_init()))
        self.bias = nnx.Param(vec(nnx.initializers.zeros_init()))
        self.mean = nnx.BatchStat(vec(nnx.initializers.zeros_init()))
        self.var = nnx.BatchStat(vec(nnx.initializers.ones_init()))

    def _conv(self, x, kernel):
        kernel = kernel.astype(self.dtype)
        if self.groups > 1 and self.groups == x.shape[-1] and self.depthwise_impl == "shifts":
            return _depthwise_shifts(x, kernel, self.stride)
        return jax.lax.conv_general_dilated(
            x, kernel, (self.stride, self.stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)

    def __call__(self, x: jax.Array) -> jax.Array:
        # BN statistics are combined in float32 whatever the compute dtype: var + 1e-3 loses precision in bf16.
        f32 = lambda v: v[...].astype(jnp.float32)  # noqa: E731
        mult = f32(self.scale) * jax.lax.rsqrt(f32(self.var) + self.eps)
        shift = f32(self.bias) - f32(self.mean) * mult
        if self.fold:
            # Scale the (small) kernel rather than the (large) activations; for backends that do not fuse the
            # affine into the conv. Rounding differs from the unfolded path by ~1e-6 relative.
            return self._conv(x, f32(self.kernel) * mult) + shift.astype(self.dtype)
        return self._conv(x, self.kernel[...]) * mult.astype(self.dtype) + shift.astype(self.dtype)


class MBConv(nnx.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, *,
                 cfg: EfficientNetLiteConfig, rngs: nnx.Rngs):
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, cfg=cfg, rngs=rngs) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride=stride, groups=mid, cfg=cfg, rngs=rngs)
        self.project = ConvBN(mid, cout, 1, cfg=cfg, rngs=rngs)
        self.skip = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.relu6(self.expand(x)) if self.expand is not None else x
        h = jax.nn.relu6(self.depthwise(h))
        h = self.project(h)  # linear bottleneck: no activation after the projection
        return x + h if self.skip else h


class EfficientNetLite(nnx.Module):
    """EfficientNet-Lite on NHWC inputs normalised with :data:`LITE_MEAN` / :data:`LITE_STD`.

    Attributes: ``stem`` (ConvBN), ``blocks`` (list of MBConv), ``head`` (ConvBN or None),
    ``classifier`` (nnx.Linear or None).
    """

    def __init__(self, cfg: EfficientNetLiteConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stem = ConvBN(3, cfg.stem_width, 3, stride=2, cfg=cfg, rngs=rngs)
        blocks, ends, cin = [], [], cfg.stem_width
        for repeats, kernel, stride, expand, cout in cfg.stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand, cfg=cfg, rngs=rngs))
                cin = cout
            ends.append(len(blocks) - 1)
        self.blocks = nnx.List(blocks)
        self.stage_ends = tuple(ends)
        self.head = ConvBN(cin, cfg.head_width, 1, cfg=cfg, rngs=rngs) if cfg.head_width else None
        self.num_features = cfg.head_width or cin
        self.classifier = nnx.Linear(
            self.num_features, cfg.num_classes, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("channels", None)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs,
        ) if cfg.num_classes else None

    def forward_features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Feature maps [B, h, w, C]: ``stage1`` .. ``stageN`` (end of each stage) and ``head`` if present."""
        x = constrain(x.astype(jnp.dtype(self.cfg.dtype)), ("batch", None, None, "channels"))
        x = jax.nn.relu6(self.stem(x))
        feats = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                feats[f"stage{self.stage_ends.index(i) + 1}"] = x
        if self.head is not None:
            feats["head"] = jax.nn.relu6(self.head(x))
        return feats

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits [B, num_classes], or the pooled last feature map [B, C] when there is no classifier."""
        feats = self.forward_features(x)
        pooled = feats["head" if self.head is not None else f"stage{len(self.stage_ends)}"].mean(axis=(1, 2))
        # Dropout before the classifier is a training-only op in the reference; this port is inference-only.
        return self.classifier(pooled) if self.classifier is not None else pooled


# ------------------------------------------------------------------------------------------------------------------
# ViT-compatible patch encoder.

@dataclasses.dataclass(frozen=True)
class EfficientNetEncoderConfig:
    """A frozen EfficientNet-Lite as a patch-feature vision encoder.

    feature_stride: 16 -> the end of the last stride-16 stage (Lite0: 112 ch, 14x14 at 224 px; the backbone is
      truncated there), 32 -> the 1280-ch head map (7x7 at 224 px).
    input_mean / input_std: the normalisation the caller applied to [0, 1] pixels (CLIP by default); the encoder
      undoes it and applies the Lite training normalisation. Pass (0, 0, 0) / (1, 1, 1) for raw [0, 1] pixels.
    """

    backbone: EfficientNetLiteConfig = EfficientNetLiteConfig()
    feature_stride: int = 16
    input_mean: tuple[float, float, float] = CLIP_MEAN
    input_std: tuple[float, float, float] = CLIP_STD
    pixel_mean: tuple[float, float, float] = LITE_MEAN
    pixel_std: tuple[float, float, float] = LITE_STD

    def backbone_for_stride(self) -> EfficientNetLiteConfig:
        """The backbone config actually built: no classifier, and truncated after the feature map it needs."""
        if self.feature_stride == 32:
            if not self.backbone.head_width:
                raise ValueError("feature_stride=32 uses the head conv; backbone.head_width must be > 0")
            return dataclasses.replace(self.backbone, num_classes=0)
        if self.feature_stride == 16:
            strides = self.backbone.stage_strides
            if 16 not in strides:
                raise ValueError(f"no stage of the backbone ends at stride 16 (stage strides {strides})")
            last = len(strides) - 1 - strides[::-1].index(16)
            return dataclasses.replace(self.backbone, stages=self.backbone.stages[:last + 1], head_width=0,
                                       num_classes=0)
        raise ValueError(f"feature_stride must be 16 or 32, got {self.feature_stride}")

    @property
    def width(self) -> int:
        """Token width D."""
        bb = self.backbone_for_stride()
        return bb.head_width or bb.stages[-1][-1]


class EfficientNetPatchEncoder(nnx.Module):
    """Vision-encoder interface over an EfficientNet-Lite feature map.

    ``__call__(pixels [B, H, W, 3]) -> VisionOutput``: tokens [B, 1 + gh*gw, D] with a CLS token equal to the
    global average of the feature map prepended to its row-major flattened cells; grid (gh, gw); pooled = CLS.
    """

    def __init__(self, cfg: EfficientNetEncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.backbone = EfficientNetLite(cfg.backbone_for_stride(), rngs=rngs)
        # Re-normalisation x_lite = x_in * a + b, folded into one affine: x01 = x_in * in_std + in_mean.
        in_mean, in_std = np.asarray(cfg.input_mean), np.asarray(cfg.input_std)
        mean, std = np.asarray(cfg.pixel_mean), np.asarray(cfg.pixel_std)
        self._scale = tuple(float(v) for v in in_std / std)
        self._shift = tuple(float(v) for v in (in_mean - mean) / std)

    def __call__(self, pixels: jax.Array, *, deterministic: bool = True) -> VisionOutput:
        """Encodes pixels normalised with ``cfg.input_mean/std``; `deterministic` is accepted for API parity."""
        del deterministic  # no dropout / stochastic depth at inference
        dtype = jnp.dtype(self.cfg.backbone.dtype)
        x = pixels.astype(jnp.float32) * jnp.asarray(self._scale) + jnp.asarray(self._shift)
        feats = self.backbone.forward_features(x.astype(dtype))
        fmap = feats["head"] if self.cfg.feature_stride == 32 else feats[f"stage{len(self.backbone.stage_ends)}"]
        b, gh, gw, c = fmap.shape
        patches = fmap.reshape(b, gh * gw, c)
        # Mean in float32 so a bf16 CLS is not a sum of 196 rounded terms.
        pooled = patches.astype(jnp.float32).mean(axis=1).astype(fmap.dtype)
        tokens = jnp.concatenate([pooled[:, None, :], patches], axis=1)
        tokens = constrain(tokens, ("batch", "length", "embed"))
        return VisionOutput(tokens=tokens, grid=(gh, gw), pooled=pooled)
