"""Compositing for the demo benchmark: cut an instance out with a soft alpha, transform it, paste it into a
context canvas, and read the exact box of what was pasted.

Every random choice is made beforehand (`Placement`, `CanvasCrop`), so rendering is a pure function of its inputs:
the same plan renders the same pixels, and a test can re-render a background without the paste to check a box.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from idmr_jax.data.demo_bench import photos

# Canvas aspect ratios outside this range are centre-cropped into it, so every image keeps its short side
# near the long side (e.g. >= 224 px at a 320 px long side) instead of becoming a thin strip.
ASPECT_RANGE = (0.7, 1.45)
# A pasted cut is never enlarged more than this: small sources (galaxies, coins) would only turn into blur.
MAX_UPSCALE = 2.5
# Alpha level that counts as "pasted" for the box; with the soft edges, the box is the cut's half-opacity outline.
BOX_ALPHA = 0.5


@dataclasses.dataclass(frozen=True)
class CanvasCrop:
    """How a context region becomes one canvas: a sub-window (side fraction, offsets in [0, 1]) and a flip.
    Different instances thus see different framings of the same context, like separate photos of one scene."""

    side: float
    fx: float
    fy: float
    flip: bool


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a cut is pasted: target box area as a fraction of the canvas, a 3x3 cell (col, row) plus an offset
    within it (both fractions of a cell), a horizontal flip and colour jitter (brightness, contrast, saturation)."""

    area: float
    cell: tuple[int, int]
    offset: tuple[float, float]
    flip: bool
    jitter: tuple[float, float, float]


def cut_alpha(cut: np.ndarray, mask: str) -> np.ndarray:
    """A float32 [h, w] alpha in [0, 1] for a cut: a feathered rectangle or ellipse, or the darkness of the pixels
    (for a black silhouette on white). Soft edges hide the seam between source and context."""
    h, w = cut.shape[:2]
    ys = (np.arange(h, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, :]
    if mask == "rect":
        feather = max(2.0, 0.06 * min(h, w))
        edge = np.minimum(np.minimum(xs, w - xs), np.minimum(ys, h - ys))
        return np.clip(edge / feather, 0.0, 1.0).astype(np.float32)
    if mask == "ellipse":
        r = np.sqrt(((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2)
        return np.clip((1.0 - r) / 0.08, 0.0, 1.0).astype(np.float32)
    if mask == "dark":
        return (1.0 - cut.astype(np.float32).mean(axis=-1) / 255.0).astype(np.float32)
    raise ValueError(f"unknown mask kind {mask!r}")


def _resize(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        return np.asarray(Image.fromarray(arr).resize((width, height), Image.Resampling.BICUBIC))
    # Alpha is resized as a float image: bilinear keeps it within [0, 1] (bicubic would overshoot).
    return np.asarray(Image.fromarray(arr, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def make_canvas(ctx: photos.Context, crop: CanvasCrop, long_side: int) -> np.ndarray:
    """The context region -> sub-window -> aspect clamp -> flip -> resized so its longer side is ``long_side``."""
    x1, y1, x2, y2 = photos.context_box(ctx)
    w, h = x2 - x1, y2 - y1
    # Sub-window of the requested side fraction, then clamp its aspect by trimming the longer side.
    cw, ch = w * crop.side, h * crop.side
    lo, hi = ASPECT_RANGE
    if cw / ch > hi:
        cw = ch * hi
    elif cw / ch < lo:
        ch = cw / lo
    cw, ch = max(1, int(round(cw))), max(1, int(round(ch)))
    ox = x1 + int(round(crop.fx * (w - cw)))
    oy = y1 + int(round(crop.fy * (h - ch)))
    region = photos.load_photo(ctx.photo)[oy:oy + ch, ox:ox + cw]
    if crop.flip:
        region = region[:, ::-1]
    scale = long_side / max(cw, ch)
    out_w, out_h = max(1, int(round(cw * scale))), max(1, int(round(ch * scale)))
    return _resize(np.ascontiguousarray(region), out_w, out_h)


def _jitter(rgb: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Colour jitter in float [0, 1]: contrast and saturation pivot on the cut's own grey level, so a grey
    source stays grey and the object keeps its identity while its lighting changes."""
    x = rgb.astype(np.float32) / 255.0 * brightness
    grey = x.mean(axis=-1, keepdims=True)
    x = (x - grey.mean()) * contrast + grey.mean()
    grey = x.mean(axis=-1, keepdims=True)
    x = grey + (x - grey) * saturation
    return np.clip(x, 0.0, 1.0)


def paste(canvas: np.ndarray, inst: photos.Instance, view: int,
          place: Placement) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste one view of ``inst`` into ``canvas`` -> (uint8 image, box [x1, y1, x2, y2] of alpha >= BOX_ALPHA,
    x2/y2 exclusive). The box is measured on the resized, flipped alpha, so it is exact for the pasted pixels."""
    photo, (bx1, by1, bx2, by2) = inst.views[view]
    cut = photos.load_photo(photo)[by1:by2, bx1:bx2]
    alpha = cut_alpha(cut, inst.mask)
    H, W = canvas.shape[:2]
    h, w = cut.shape[:2]
    # Scale to the requested area, but keep the cut inside 90% of either side and within MAX_UPSCALE.
    s = min(math.sqrt(place.area * W * H / (w * h)), 0.9 * W / w, 0.9 * H / h, MAX_UPSCALE)
    pw, ph = max(8, int(round(w * s))), max(8, int(round(h * s)))
    cut_s = _resize(np.ascontiguousarray(cut), pw, ph)
    alpha_s = np.clip(_resize(alpha, pw, ph), 0.0, 1.0)
    if place.flip:
        cut_s, alpha_s = cut_s[:, ::-1], alpha_s[:, ::-1]
    rgb = _jitter(cut_s, *place.jitter)
    # Centre the cut in its grid cell (plus the offset), then keep it fully inside the canvas.
    cx = (place.cell[0] + 0.5 + place.offset[0]) / 3.0 * W
    cy = (place.cell[1] + 0.5 + place.offset[1]) / 3.0 * H
    x0 = int(min(max(round(cx - pw / 2), 0), W - pw))
    y0 = int(min(max(round(cy - ph / 2), 0), H - ph))
    out = canvas.astype(np.float32) / 255.0
    a = alpha_s[..., None]
    out[y0:y0 + ph, x0:x0 + pw] = out[y0:y0 + ph, x0:x0 + pw] * (1.0 - a) + rgb * a
    image = np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
    rows = np.flatnonzero((alpha_s >= BOX_ALPHA).any(axis=1))
    cols = np.flatnonzero((alpha_s >= BOX_ALPHA).any(axis=0))
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    return image, box
