"""Box geometry for AdaFocal: box -> patch mask M_B, IoU, and box perturbations for the robustness study.

M_B (released ``bbox_to_patch_mask`` in ``lavis/models/blip2_models/blip2_qformer_oacir_adafocal.py``) marks
every patch the box touches, token ``row * gw + col + 1`` (index 0 is the CLS token and is never set); no box ->
all zeros, so the activation bias ``beta * M_B`` vanishes. Which patches a box touches depends on what the
encoder's grid is, so every caller says it (``patch``):

* ``patch=p`` (ViT encoders, the official rule): columns ``floor(x1 / p)`` up to ``ceil(x2 / p)`` (exclusive,
  clipped to the grid), rows likewise. This is what a stride-``p`` patch convolution sees: patch ``c`` covers
  pixels ``[c p, (c + 1) p)`` whatever the image size, and pixels past the last whole patch are dropped (e.g.
  230 px with patch 14: grid 16, and the last 6 px belong to no patch).
* ``patch=None`` (encoders whose grid is not a patch grid, e.g. the laptop demo's EfficientNet stride-16 feature
  map with "SAME" padding): the box is scaled to the grid, ``floor(x1 * gw / W)`` up to ``ceil(x2 * gw / W)``,
  i.e. the grid cells evenly divide the image. ``x * g / W`` is used rather than ``x / (W / g)`` because it is
  exact whenever the true value is an integer.

Both rules agree whenever the image is a whole number of patches (224 px, patch 14, grid 16).

Box perturbations (paper Table 10: the box rescaled to IoU 0.8, rescaled and shifted to IoU 0.5, or no box)
are not in the released code; they are defined here, deterministic from a seed, and hit the IoU exactly (up
to bisection precision) after clipping to the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

PERTURBATIONS = ("exact", "scale", "scale_shift", "none")


def _cell_range(lo: float, hi: float, cells: int, extent: int, patch: int | None) -> tuple[int, int]:
    """Half-open range of grid cells along one axis touched by [lo, hi], clipped to the grid."""
    if patch is not None:
        return max(0, math.floor(lo / patch)), min(cells, math.ceil(hi / patch))
    return max(0, math.floor(lo * cells / extent)), min(cells, math.ceil(hi * cells / extent))


def _patch_ranges(box, grid: tuple[int, int], image_size: tuple[int, int],
                  patch: int | None) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), half-open and clipped to the grid."""
    (gh, gw), (h, w) = grid, image_size
    x1, y1, x2, y2 = (float(v) for v in box)
    r0, r1 = _cell_range(y1, y2, gh, h, patch)
    c0, c1 = _cell_range(x1, x2, gw, w, patch)
    return r0, r1, c0, c1


def box_to_patch_mask(
    box, grid: tuple[int, int], image_size: tuple[int, int], *, patch: int | None
) -> np.ndarray:
    """float32 ``[1 + gh*gw]`` mask of the patch tokens covered by ``box = [x1, y1, x2, y2]`` (or None).

    `grid` is ``(rows, cols)`` of tokens and `image_size` is ``(H, W)`` in the box's pixel frame. `patch`: the
    ViT's patch size (the official rule), or None for a grid that is not a patch grid (the box is scaled to it);
    see the module docstring. Entry 0 (CLS) stays 0; token ``row*gw + col + 1`` is 1 for every touched patch.
    """
    gh, gw = grid
    mask = np.zeros(1 + gh * gw, np.float32)
    if box is None:
        return mask
    r0, r1, c0, c1 = _patch_ranges(box, grid, image_size, patch)
    if r0 < r1 and c0 < c1:
        mask[1:].reshape(gh, gw)[r0:r1, c0:c1] = 1.0
    return mask


def box_to_patch_mask_batch(
    boxes: jnp.ndarray,
    valid: jnp.ndarray | None,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    *,
    patch: int | None,
) -> jnp.ndarray:
    """Batched, jit-friendly :func:`box_to_patch_mask`: ``boxes [B, 4]`` and ``valid [B]`` -> ``[B, 1+gh*gw]``.

    Rows whose `valid` flag is False (the "no box" case; the box values are then ignored) are all zeros.
    Same rounding and the same `patch` rule as the NumPy version; `grid`, `image_size` and `patch` are static.
    """
    gh, gw = grid
    h, w = image_size
    boxes = jnp.asarray(boxes, jnp.float32)
    x1, y1, x2, y2 = (boxes[:, i, None] for i in range(4))
    cols = jnp.arange(gw, dtype=jnp.float32)[None]
    rows = jnp.arange(gh, dtype=jnp.float32)[None]
    # Cell c covers [c*W/gw, (c+1)*W/gw) (scaled) or [c*p, (c+1)*p) (patch): it is touched iff floor(x1/size) <= c
    # < ceil(x2/size), i.e. x1 < (c+1)*size and c*size < x2, written here multiplied through by gw (scaled)
    # because XLA turns x/const into x*(1/const), which is inexact at cell borders. The comparisons also clip to
    # the grid for free.
    if patch is not None:
        col_in = (x1 < (cols + 1) * patch) & (cols * patch < x2)
        row_in = (y1 < (rows + 1) * patch) & (rows * patch < y2)
    else:
        col_in = (x1 * gw < (cols + 1) * w) & (cols * w < x2 * gw)
        row_in = (y1 * gh < (rows + 1) * h) & (rows * h < y2 * gh)
    patches = (row_in[:, :, None] & col_in[:, None, :]).reshape(boxes.shape[0], gh * gw)
    if valid is not None:
        patches = patches & jnp.asarray(valid, bool)[:, None]
    cls = jnp.zeros((boxes.shape[0], 1), jnp.float32)
    return jnp.concatenate([cls, patches.astype(jnp.float32)], axis=1)


def box_iou(a, b) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes; 0 when the union is empty."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = _area(a) + _area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def _area(b) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _clip(b: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    h, w = image_size
    return np.clip(b, 0.0, [w, h, w, h])


def _bisect(f, lo: float, hi: float, target: float, iters: int = 80) -> float:
    """Finds t in [lo, hi] with f(t) == target, given f(lo) > target >= f(hi) and f continuous."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def _scaled(box: np.ndarray, sx: float, sy: float) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) * sx / 2, (box[3] - box[1]) * sy / 2
    return np.array([cx - hw, cy - hh, cx + hw, cy + hh])


def scale_box(box, iou: float, image_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Rescales `box` about its centre so that its IoU with the original is `iou` (after clipping).

    The area changes by ``1/iou`` (enlarge) or ``iou`` (shrink), chosen at random, split unevenly between
    width and height by a random aspect exponent. Enlarging is solved by bisection because clipping to the
    image eats into the growth; when even the whole image is not large enough, the box shrinks instead.
    """
    box = np.asarray(box, np.float64)
    beta = rng.uniform(0.3, 0.7)  # share of the log-area change that goes to the width
    enlarge = rng.random() < 0.5
    h, w = image_size
    if enlarge and _area(box) / (w * h) < iou:
        f = lambda s: box_iou(_clip(_scaled(box, s**beta, s ** (1 - beta)), image_size), box)  # noqa: E731
        # At s_max the scaled box covers the whole image (each side grows >= max(w, h)/side).
        side = max(min(box[2] - box[0], box[3] - box[1]), 1e-6)
        s_max = (2.0 * max(w, h) / side) ** (1.0 / min(beta, 1 - beta))
        s = _bisect(f, 1.0, s_max, iou)
        return _clip(_scaled(box, s**beta, s ** (1 - beta)), image_size)
    # Shrinking keeps the box inside the original, so IoU = area ratio exactly, no clipping needed.
    return _scaled(box, iou**beta, iou ** (1 - beta))


def scale_shift_box(
    box, iou: float, image_size: tuple[int, int], rng: np.random.Generator, max_tries: int = 16
) -> np.ndarray:
    """Rescales `box` (area x [0.8, 1.25]) and shifts it in a random direction until its IoU is `iou`.

    The shift is found by bisection along the direction (IoU is continuous in the shift and drops to 0), on
    the box clipped to the image. Directions that push more than half of the box off the image are redrawn
    (up to `max_tries`, then the last one is kept), so the result still looks like a box around something.
    """
    box = np.asarray(box, np.float64)
    beta = rng.uniform(0.3, 0.7)
    area_factor = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    scaled = _scaled(box, area_factor**beta, area_factor ** (1 - beta))
    bw, bh = scaled[2] - scaled[0], scaled[3] - scaled[1]
    out = None
    for _ in range(max_tries):
        theta = rng.uniform(0.0, 2.0 * math.pi)
        # Step in box-relative units: along the dominant axis one unit of t moves one (scaled) box side.
        u = np.array([math.cos(theta) * bw, math.sin(theta) * bh])
        u = u / max(abs(math.cos(theta)), abs(math.sin(theta)))
        step = np.array([u[0], u[1], u[0], u[1]])
        f = lambda t: box_iou(_clip(scaled + t * step, image_size), box)  # noqa: E731
        if f(0.0) <= iou:  # cannot happen for iou < 0.8, kept for arbitrary targets
            return _clip(scaled, image_size)
        # Past t_max the boxes are disjoint along the dominant axis, so f(t_max) = 0 <= iou.
        t_max = 1.0 + (box[2] - box[0] + box[3] - box[1]) / max(min(bw, bh), 1e-6)
        t = _bisect(f, 0.0, t_max, iou)
        out = _clip(scaled + t * step, image_size)
        if _area(out) >= 0.5 * bw * bh:
            return out
    return out


def perturb_box(
    box, mode: str, image_size: tuple[int, int], seed: int | Sequence[int] = 0, iou: float | None = None
) -> np.ndarray | None:
    """Robustness-study box (paper Table 10), deterministic in `seed` (pass e.g. ``(seed, query_index)``).

    Modes: ``"exact"`` (unchanged), ``"scale"`` (IoU 0.8 by default), ``"scale_shift"`` (IoU 0.5 by
    default), ``"none"`` (returns None: no box, so M_B is zero). `image_size` is ``(H, W)`` of the box's frame.
    """
    if mode not in PERTURBATIONS:
        raise ValueError(f"unknown box perturbation {mode!r}; expected one of {PERTURBATIONS}")
    if box is None or mode == "none":
        return None
    if mode == "exact":
        return np.asarray(box, np.float64)
    if _area(box) <= 0:
        raise ValueError(f"cannot perturb an empty box {list(box)}")
    rng = np.random.default_rng(seed)
    if mode == "scale":
        return scale_box(box, 0.8 if iou is None else iou, image_size, rng)
    return scale_shift_box(box, 0.5 if iou is None else iou, image_size, rng)
