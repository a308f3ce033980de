"""Vision encoders behind one interface: ``pixels [B,H,W,3] -> VisionOutput(tokens [B,1+gh*gw,D], grid)``.

BLIP-2 and AdaFocal take any of them: the ViT family (EVA-g, CLIP) or, for the laptop demo, a frozen
EfficientNet-Lite0 whose feature map becomes the patch tokens. `vision_grid` tells the data pipeline which patch
grid a box must be rasterised on.
"""

from __future__ import annotations

import math

from flax import nnx

from idmr_jax.models.efficientnet import EfficientNetEncoderConfig, EfficientNetPatchEncoder
from idmr_jax.models.vit import VisionTransformer, ViTConfig, patch_grid

VisionConfig = ViTConfig | EfficientNetEncoderConfig


def build_vision_encoder(cfg: VisionConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if isinstance(cfg, ViTConfig):
        return VisionTransformer(cfg, rngs=rngs)
    if isinstance(cfg, EfficientNetEncoderConfig):
        return EfficientNetPatchEncoder(cfg, rngs=rngs)
    raise TypeError(f"unsupported vision config {type(cfg).__name__}")


def vision_grid(cfg: VisionConfig, image_size: int) -> tuple[int, int]:
    """The (gh, gw) token grid for square `image_size` inputs."""
    if isinstance(cfg, ViTConfig):
        return patch_grid(cfg, image_size, image_size)
    # TF-"SAME" convolutions: every stride-2 stage rounds up.
    side = image_size
    for _ in range(int(math.log2(cfg.feature_stride))):
        side = math.ceil(side / 2)
    return (side, side)


def mask_patch_size(cfg: VisionConfig) -> int | None:
    """The ``patch`` a box mask on this encoder's grid is rasterised with (``idmr_jax.data.boxes``): the ViT's patch
    size (the official rule, what its patch convolution sees), None for the EfficientNet feature map, whose "SAME"
    padded stride-16 grid is not a patch grid (the box is scaled to it)."""
    return cfg.patch_size if isinstance(cfg, ViTConfig) else None


def vision_layer_norm_eps(cfg: VisionConfig) -> float:
    """Epsilon for BLIP-2's ``ln_vision`` when the config does not set one (transformers: the ViT's eps)."""
    return getattr(cfg, "layer_norm_eps", 1e-6)
