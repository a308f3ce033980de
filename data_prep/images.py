"""Image checks and optional downsizing for dataset converters.

Converters store encoded image bytes and leave decoding to the input pipeline; these helpers make sure what is
stored decodes, and shrink oversized images when asked to.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

from PIL import Image

# Formats re-encoded as JPEG when downsizing (lossy sources stay lossy); everything else becomes PNG, so
# transparency and palettes survive and nothing lossless is made lossy.
_JPEG_SOURCES = {"JPEG", "MPO", "WEBP"}
JPEG_QUALITY = 95


def probe_image(path: str) -> dict[str, Any]:
    """Stats and fully decodes one image file: ``{"size", "mtime_ns", "width", "height", "error"}``.

    ``Image.load()`` decodes every pixel, so truncated files fail here (``verify()`` alone misses a truncated
    entropy-coded stream). ``error`` is None for a usable image, else a one-line reason; a missing file gives
    ``size`` None. Decompression-bomb warnings count as errors: such a file would stall a training worker.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {"size": None, "mtime_ns": None, "width": None, "height": None, "error": "image file not found"}
    out: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "width": None, "height": None}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:  # a directory, no permission, ...
        return {**out, "error": f"image cannot be read: {type(e).__name__}: {e}"}
    probed = probe_bytes(data)
    out["width"], out["height"], out["error"] = probed["width"], probed["height"], probed["error"]
    return out


def probe_bytes(data: bytes) -> dict[str, Any]:
    """Fully decodes encoded image bytes: ``{"width", "height", "format", "error"}`` (error None when usable;
    the same rules as `probe_image`)."""
    out: dict[str, Any] = {"width": None, "height": None, "format": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                out["format"] = im.format
                im.load()
                out["width"], out["height"] = im.size
        out["error"] = None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for broken files
        out["error"] = f"image does not decode: {type(e).__name__}: {e}"
    return out


def encode_jpeg(image: Image.Image) -> bytes:
    """RGB JPEG bytes (quality `JPEG_QUALITY`, no chroma subsampling, no EXIF): deterministic for equal pixels."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def shrink_to_max_side(data: bytes, max_side: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Re-encodes ``data`` so its longer side is at most ``max_side``; returns (bytes, (w, h) new, (w, h) old).

    Images already within the limit keep their original bytes (no generational loss). Larger ones are resized
    with Lanczos and saved as JPEG (quality 95, for JPEG-like sources) or PNG. No EXIF transpose is applied and
    no EXIF is written: boxes are annotated in raw pixel order, so the stored pixels must stay in that order.
    Output is deterministic for a given input (fixed encoder settings, no timestamps).
    """
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        if max_side <= 0 or max(w, h) <= max_side:
            return data, (w, h), (w, h)
        scale = max_side / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        fmt = im.format
        im.load()
        if fmt in _JPEG_SOURCES and im.mode in ("RGB", "L", "CMYK"):
            resized = im.resize(new, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            resized.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        else:
            src = im if im.mode in ("RGB", "RGBA", "L", "LA", "I", "I;16") else im.convert("RGBA")
            resized = src.resize(new, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            resized.save(buf, format="PNG", optimize=False)
        return buf.getvalue(), new, (w, h)


def scale_box(box: tuple[float, ...] | None, old: tuple[int, int], new: tuple[int, int]) -> tuple[float, ...] | None:
    """Maps a box from an image of size ``old`` to the same image resized to ``new`` (per-axis factors, so the
    box keeps covering the same pixels despite the rounding of the new size)."""
    if box is None or old == new:
        return box
    sx, sy = new[0] / old[0], new[1] / old[1]
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, min(x2 * sx, new[0]), min(y2 * sy, new[1]))
