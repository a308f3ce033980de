"""Image file reading, checks and optional downsizing for dataset converters.

Converters store encoded image bytes and leave decoding to the input pipeline; these helpers make sure what is
stored decodes, and shrink oversized images when asked to.

Every image a converter reads from a user's folder goes through `check_image_file` / `read_image_file`, the one
place of the read rules (`ReadRules`): the path is resolved (``os.path.realpath``) and must lie inside the
(resolved) dataset root unless external symlinks are allowed; only regular files are read (a FIFO, device or
directory is refused before it is opened, so nothing blocks or reads without bound); and a file may hold at most
``max_bytes``. A refusal is an `ImageFileRefused` carrying the skip code and reason the converters report.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import stat
import warnings
from typing import Any

from PIL import Image

# Formats re-encoded as JPEG when downsizing (lossy sources stay lossy); everything else becomes PNG, so
# transparency and palettes survive and nothing lossless is made lossy.
_JPEG_SOURCES = {"JPEG", "MPO", "WEBP"}
JPEG_QUALITY = 95


DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # 64 MiB: far above any photograph of the supported datasets


@dataclasses.dataclass(frozen=True)
class ReadRules:
    """Which image files a converter may read from a user's folder (see the module docstring)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    follow_external_symlinks: bool = False  # allow paths resolving outside the dataset root (then reported)

    def __post_init__(self):
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")


class ImageFileRefused(Exception):
    """An image file that is missing or that the read rules refuse: ``code`` is the skip code, str() the reason."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


@dataclasses.dataclass(frozen=True)
class CheckedFile:
    """An image file the read rules accept: its resolved path, size, mtime, and whether it lies outside the root."""

    path: str
    size: int
    mtime_ns: int
    external: bool


def check_size(size: int, rules: ReadRules) -> None:
    """Raises `ImageFileRefused` (``image_too_large``) for a file of ``size`` bytes over ``rules.max_bytes``."""
    if size > rules.max_bytes:
        raise ImageFileRefused("image_too_large", f"image too large ({size} bytes > {rules.max_bytes})")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def check_image_file(path: str, root: str, rules: ReadRules = ReadRules()) -> CheckedFile:
    """Applies the read rules to ``path`` without opening it; raises `ImageFileRefused` (codes
    ``missing_image``, ``outside_root``, ``not_regular_file``, ``image_too_large``)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    try:
        external = os.path.commonpath([real, real_root]) != real_root
    except ValueError:  # different drives
        external = True
    # Checked before stat: nothing outside the root is touched unless allowed.
    if external and not rules.follow_external_symlinks:
        raise ImageFileRefused("outside_root", f"resolves to {real}, outside the dataset root {real_root} "
                               "(follow such links with --follow-external-symlinks)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ImageFileRefused("missing_image", "image file not found") from None
    except OSError as e:  # no permission on a folder, a link loop, ...
        raise ImageFileRefused("undecodable_image", f"image cannot be read: {type(e).__name__}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageFileRefused("not_regular_file", f"not a regular file ({_file_kind(st.st_mode)}); not read")
    check_size(st.st_size, rules)
    return CheckedFile(real, st.st_size, st.st_mtime_ns, external)


def read_image_file(path: str, root: str, rules: ReadRules = ReadRules()) -> tuple[bytes, CheckedFile]:
    """`check_image_file`, then the file's bytes. The file is opened without following a link and without
    blocking, and re-checked on the open descriptor, so a file swapped after the check (for a link, a FIFO or a
    bigger file) is refused rather than followed, waited on or read past ``rules.max_bytes``."""
    checked = check_image_file(path, root, rules)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(checked.path, flags)
    except OSError as e:
        raise ImageFileRefused("undecodable_image", f"image cannot be read: {type(e).__name__}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileRefused("not_regular_file", f"not a regular file ({_file_kind(st.st_mode)}); not read")
        data = f.read(rules.max_bytes + 1)
    check_size(len(data), rules)  # the file grew since the check: at most max_bytes + 1 were read
    return data, checked


def probe_image(path: str, root: str, rules: ReadRules = ReadRules()) -> dict[str, Any]:
    """Reads (`read_image_file`) and fully decodes one image file:
    ``{"size", "mtime_ns", "width", "height", "error", "code"}``.

    ``Image.load()`` decodes every pixel, so truncated files fail here (``verify()`` alone misses a truncated
    entropy-coded stream). ``error`` is None for a usable image, else a one-line reason, and ``code`` its skip code
    (``missing_image``, ``undecodable_image`` or a read-rule refusal); a missing or refused file gives ``size``
    None. Decompression-bomb warnings count as errors: such a file would stall a training worker.
    """
    try:
        data, checked = read_image_file(path, root, rules)
    except ImageFileRefused as e:
        return {"size": None, "mtime_ns": None, "width": None, "height": None, "error": str(e), "code": e.code}
    probed = probe_bytes(data)
    return {"size": checked.size, "mtime_ns": checked.mtime_ns, "width": probed["width"], "height": probed["height"],
            "error": probed["error"], "code": None if probed["error"] is None else "undecodable_image"}


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
        out["error"] = f"image does not decode: {type(e).__name__}: {_without_addresses(str(e))}"
    return out


def _without_addresses(message: str) -> str:
    """PIL's messages may name an object's address ("<_io.BytesIO object at 0x7f...>"): dropped, so that equal
    inputs give equal skip reasons and manifests."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", message)


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
