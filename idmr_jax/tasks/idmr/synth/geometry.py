"""Box checks, instance filters and crop rectangles for the IDMR synthesis (pure functions, pixel units).

Boxes arrive as COCO ``[x, y, w, h]`` (top-left corner plus size, floats, in pixels of the image as annotated) and
are turned into ``[x1, y1, x2, y2]`` clipped to the image. The defaults below are this project's choices (the
IDMR paper does not publish its size thresholds): crops smaller than 32 px a side make poor queries, and boxes
covering almost the whole frame leave no surroundings to caption.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

Box = tuple[float, float, float, float]
Rect = tuple[int, int, int, int]
SNAP_PX = 1e-3


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """Which instances become triplets.

    ``min_side``: the clipped box's width and height, each in pixels, must be >= this.
    ``min_area_ratio`` / ``max_area_ratio``: clipped box area / image area must lie in this closed interval.
    ``context_pad``: the crop grows by this fraction of the box's width (height) on the left and right (top and
    bottom) before it is clipped to the image; 0 crops exactly the box.
    """

    min_side: float = 32.0
    min_area_ratio: float = 0.01
    max_area_ratio: float = 0.8
    context_pad: float = 0.0

    def __post_init__(self):
        if self.min_side < 0 or self.context_pad < 0:
            raise ValueError(f"min_side and context_pad must be >= 0: {self}")
        if not 0.0 <= self.min_area_ratio <= self.max_area_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_area_ratio <= max_area_ratio <= 1: {self}")


def parse_xywh(value: Any) -> tuple[Box | None, str | None, str]:
    """COCO ``[x, y, w, h]`` -> (unclipped ``[x1, y1, x2, y2]``, error code or None, reason)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None, "box_malformed", f"expected [x, y, w, h], got {value!r}"
    if any(isinstance(c, bool) or not isinstance(c, (int, float)) for c in value):
        return None, "box_malformed", f"box values must be numbers, got {value!r}"
    x, y, w, h = (float(c) for c in value)
    if not all(math.isfinite(c) for c in (x, y, w, h)):
        return None, "box_nonfinite", f"box has non-finite values {value!r}"
    if w <= 0 or h <= 0:
        return None, "box_empty", f"box has zero or negative size {value!r}"
    return (x, y, x + w, y + h), None, ""


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """The part of ``box`` inside a ``width`` x ``height`` image, or None when nothing of it is."""
    x1, y1, x2, y2 = max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(width)), min(box[3], float(height))
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def filter_reason(box: Box, width: int, height: int, spec: FilterSpec) -> tuple[str | None, str]:
    """(skip code or None, reason) for a clipped box under the size and area-ratio filters."""
    w, h = box[2] - box[0], box[3] - box[1]
    if w < spec.min_side or h < spec.min_side:
        return "too_small", f"box {w:.1f}x{h:.1f} px, need >= {spec.min_side:g} px a side"
    ratio = w * h / (width * height)
    if ratio < spec.min_area_ratio:
        return "area_ratio_low", f"box covers {ratio:.4f} of the image, need >= {spec.min_area_ratio:g}"
    if ratio > spec.max_area_ratio:
        return "area_ratio_high", f"box covers {ratio:.4f} of the image, need <= {spec.max_area_ratio:g}"
    return None, ""


def crop_rect(box: Box, width: int, height: int, context_pad: float = 0.0) -> Rect:
    """Integer pixel rectangle to cut: the box grown by ``context_pad`` of its size per side, rounded outwards
    (so every pixel the box touches is kept) and clipped to the image."""
    pw, ph = context_pad * (box[2] - box[0]), context_pad * (box[3] - box[1])
    # Within SNAP_PX of an integer counts as that integer: float32-normalised boxes (TFDS) carry ~1e-4 px of noise
    # that must not widen a crop by a whole pixel.
    x1 = min(max(0, math.floor(box[0] - pw + SNAP_PX)), width - 1)
    y1 = min(max(0, math.floor(box[1] - ph + SNAP_PX)), height - 1)
    x2 = max(min(width, math.ceil(box[2] + pw - SNAP_PX)), x1 + 1)  # never empty, even for a sliver of a box
    y2 = max(min(height, math.ceil(box[3] + ph - SNAP_PX)), y1 + 1)
    return (x1, y1, x2, y2)


# --- where a box is, for the template captions -------------------------------------------------------------

_COLS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")


def position_key(box: Box, width: int, height: int) -> tuple[str, str]:
    """(column, row) of the box centre in the image's 3x3 grid of thirds."""
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    return _COLS[min(max(int(cx * 3), 0), 2)], _ROWS[min(max(int(cy * 3), 0), 2)]


def size_key(box: Box, width: int, height: int) -> str:
    """'small' (< 5% of the image), 'large' (>= 30%) or 'medium'."""
    frac = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
    return "small" if frac < 0.05 else "large" if frac >= 0.3 else "medium"


def box_gap(a: Box, b: Box) -> float:
    """Distance between two boxes' nearest edges (0 when they touch or overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0.0)
    dy = max(b[1] - a[3], a[1] - b[3], 0.0)
    return math.hypot(dx, dy)


def relation(obj: Box, other: Box) -> str:
    """Where ``obj`` is relative to ``other``, along the axis where their centres differ more (image y points
    down): 'left of', 'right of', 'above' or 'below'."""
    dx = (obj[0] + obj[2]) / 2 - (other[0] + other[2]) / 2
    dy = (obj[1] + obj[3]) / 2 - (other[1] + other[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"
