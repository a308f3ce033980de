"""AdaFocal / OACIR image preprocessing and the matching box transform (NumPy + PIL, no JAX).

The released pipeline (``data_utils.targetpad_transform`` in HaHaJun1101/OACIR) is the torchvision chain
``TargetPad(1.25) -> Resize(224, bicubic) -> CenterCrop(224) -> RGB -> ToTensor -> Normalize(CLIP)``, and the
reference box is mapped by ``transform_bbox_targetpad`` through the same pad / scale / crop. Both are reproduced
here as pure functions on HWC uint8 arrays (or PIL images) so a Grain ``MapTransform`` can call them in workers.

Released-code details kept on purpose (they decide which patches M_B covers):
- TargetPad pads symmetrically, ``int((long/ratio - short)/2)`` pixels on EACH side of the short axis, with
  black (0); the ``int`` truncation means the padded ratio is only approximately ``ratio``. An image whose ratio
  is exactly ``ratio`` goes through the padding branch with zero padding.
- The image is resized as torchvision does (short side -> size, long side -> ``int(size*long/short)``) and
  cropped at ``round((len - size)/2)``; the box instead uses ``scale = size/short`` on both axes, the long side
  ``int(long*scale)`` and the *fractional* crop start ``(len - size)/2``. The two can differ by under a pixel;
  we follow the released box formula exactly rather than "fixing" it.
- The final box is clipped to ``[0, size]``, rejected (None) when empty, and truncated to integers.
"""

from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# InternVL's normalisation (its checkpoints' preprocessor_config.json image_mean / image_std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageLike = Union[np.ndarray, Image.Image]


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Returns `image` as an HWC uint8 RGB array (grey -> 3 channels, alpha dropped)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an HWC image with 1, 3 or 4 channels, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def target_pad_offsets(width: int, height: int, ratio: float = 1.25) -> tuple[int, int]:
    """Per-side padding ``(horizontal, vertical)`` that TargetPad adds; (0, 0) when the image is left alone.

    Padding happens only when ``max/min >= ratio`` and brings the short side up to ``long/ratio``
    (truncated, split evenly). ``ratio=1.0`` is the released SquarePad.
    """
    if min(width, height) <= 0:
        raise ValueError(f"image has an empty side: {width}x{height}")
    if max(width, height) / min(width, height) < ratio:
        return 0, 0
    scaled = max(width, height) / ratio
    return max(int((scaled - width) / 2), 0), max(int((scaled - height) / 2), 0)


def target_pad(image: ImageLike, ratio: float = 1.25) -> np.ndarray:
    """Pads the short side with black so that ``long/short`` is about `ratio` (released TargetPad)."""
    arr = to_rgb_array(image)
    hp, vp = target_pad_offsets(arr.shape[1], arr.shape[0], ratio)
    if hp == 0 and vp == 0:
        return arr
    return np.pad(arr, ((vp, vp), (hp, hp), (0, 0)), mode="constant", constant_values=0)


def resized_size(width: int, height: int, size: int = 224) -> tuple[int, int]:
    """``(new_w, new_h)`` of torchvision ``Resize(size)``: short side -> size, long side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shorter(image: ImageLike, size: int = 224) -> np.ndarray:
    """Bicubic resize of the shorter side to `size` (PIL, as torchvision does for PIL inputs)."""
    arr = to_rgb_array(image)
    new_w, new_h = resized_size(arr.shape[1], arr.shape[0], size)
    if (new_w, new_h) == (arr.shape[1], arr.shape[0]):
        return arr  # torchvision returns the image untouched when the size already matches
    return np.asarray(Image.fromarray(arr).resize((new_w, new_h), Image.Resampling.BICUBIC))


def center_crop(image: ImageLike, size: int = 224) -> np.ndarray:
    """Central ``size x size`` crop; offsets ``round((len - size)/2)`` (Python rounding, like torchvision)."""
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return arr[top : top + size, left : left + size]


def normalize(image: ImageLike, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 HWC -> float32 HWC ``(x/255 - mean)/std`` (ToTensor + Normalize, channels last)."""
    arr = to_rgb_array(image).astype(np.float32) / np.float32(255.0)
    return (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def transform_box(
    box, original_size: tuple[int, int], size: int = 224, pad_ratio: float = 1.25
) -> np.ndarray | None:
    """Maps ``[x1, y1, x2, y2]`` (original pixels) into the preprocessed ``size x size`` frame.

    `original_size` is ``(width, height)``. Follows the released ``transform_bbox_targetpad``: pad offset,
    ``scale = size/short side`` on both axes, fractional centre-crop offset, clip to ``[0, size]``; None if the
    clipped box is empty (checked before truncation), else the corners truncated to integers (float32 array).
    """
    if box is None:
        return None
    w, h = original_size
    x1, y1, x2, y2 = (float(v) for v in box)
    hp, vp = target_pad_offsets(w, h, pad_ratio)
    pw, ph = w + 2 * hp, h + 2 * vp
    if pw < ph:
        scale = size / pw
        rw, rh = size, int(ph * scale)
    else:
        scale = size / ph
        rw, rh = int(pw * scale), size
    cx, cy = (rw - size) / 2, (rh - size) / 2
    fx1 = max(0.0, (x1 + hp) * scale - cx)
    fy1 = max(0.0, (y1 + vp) * scale - cy)
    fx2 = min(float(size), (x2 + hp) * scale - cx)
    fy2 = min(float(size), (y2 + vp) * scale - cy)
    if fx1 >= fx2 or fy1 >= fy2:
        return None
    # int() truncates; all corners are >= 0 here, so this is floor, as in the released code.
    return np.array([int(fx1), int(fy1), int(fx2), int(fy2)], np.float32)


def preprocess(
    image: ImageLike, box=None, size: int = 224, pad_ratio: float = 1.25
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full AdaFocal preprocessing: returns (float32 ``[size, size, 3]`` pixels, box in that frame or None).

    `box` is ``[x1, y1, x2, y2]`` in original pixels (or None); it goes through the same pad/resize/crop map
    (:func:`transform_box`) and becomes None when nothing of it is left inside the crop.
    """
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    pixels = normalize(center_crop(resize_shorter(target_pad(arr, pad_ratio), size), size))
    return pixels, transform_box(box, (w, h), size, pad_ratio)

