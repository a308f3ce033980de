"""AdaFocal preprocessing and the box map, against hand-computed geometry."""

import numpy as np
import pytest
from PIL import Image

from idmr_jax.data import image_ops as ops

MEAN = np.asarray(ops.CLIP_MEAN, np.float32)
STD = np.asarray(ops.CLIP_STD, np.float32)


def _image(w, h, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (h, w, 3), dtype=np.uint8)


def test_target_pad_offsets():
    # 400x200: ratio 2 >= 1.25 -> short side to 400/1.25 = 320, i.e. 60 rows above and below.
    assert ops.target_pad_offsets(400, 200) == (0, 60)
    assert ops.target_pad_offsets(200, 400) == (60, 0)
    assert ops.target_pad_offsets(240, 200) == (0, 0)  # ratio 1.2 < 1.25: untouched
    assert ops.target_pad_offsets(250, 200) == (0, 0)  # exactly 1.25: padding branch, zero padding
    assert ops.target_pad_offsets(301, 100) == (0, 70)  # (240.8 - 100)/2 = 70.4 -> 70 (truncated)
    assert ops.target_pad_offsets(300, 200, ratio=1.0) == (0, 50)  # ratio 1 = SquarePad


def test_target_pad_is_centered_and_black():
    img = _image(400, 200)
    out = ops.target_pad(img)
    assert out.shape == (320, 400, 3)
    np.testing.assert_array_equal(out[60:260], img)
    assert not out[:60].any() and not out[260:].any()
    assert ops.target_pad(_image(240, 200)) is not None and ops.target_pad(_image(240, 200)).shape == (200, 240, 3)


def test_resize_and_crop_sizes():
    assert ops.resized_size(400, 320) == (280, 224)
    assert ops.resized_size(300, 200) == (336, 224)
    assert ops.resized_size(200, 301) == (224, 337)  # int(224*301/200) = int(337.12)
    assert ops.resize_shorter(_image(400, 320)).shape == (224, 280, 3)
    img = _image(281, 224)
    # (281-224)/2 = 28.5 rounds (half to even) to 28, like torchvision's int(round(.)).
    np.testing.assert_array_equal(ops.center_crop(img), img[:, 28:252])
    with pytest.raises(ValueError):
        ops.center_crop(_image(100, 300))


def test_resize_matches_pil_bicubic():
    img = _image(400, 320)
    want = np.asarray(Image.fromarray(img).resize((280, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ops.resize_shorter(img), want)


def test_normalize():
    img = np.array([[[0, 255, 128]]], np.uint8)
    want = (np.array([0.0, 1.0, 128 / 255], np.float32) - MEAN) / STD
    out = ops.normalize(img)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], want, rtol=1e-6)


def test_preprocess_pixels_400x200():
    img = _image(400, 200)
    pixels, box = ops.preprocess(img)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.float32 and box is None
    padded = np.zeros((320, 400, 3), np.uint8)
    padded[60:260] = img
    want = np.asarray(Image.fromarray(padded).resize((280, 224), Image.Resampling.BICUBIC))[:, 28:252]
    np.testing.assert_allclose(pixels, (want / np.float32(255) - MEAN) / STD, atol=1e-6)
    # Pad rows map to rows [0, 42) of the output; away from the seam they are exactly normalised black.
    np.testing.assert_allclose(pixels[:38], np.broadcast_to(-MEAN / STD, (38, 224, 3)), atol=1e-6)


def test_preprocess_accepts_pil_and_grey():
    img = _image(300, 260)
    a, _ = ops.preprocess(img)
    b, _ = ops.preprocess(Image.fromarray(img))
    np.testing.assert_array_equal(a, b)
    grey = img[..., 0]
    c, _ = ops.preprocess(grey)
    np.testing.assert_array_equal(c, ops.preprocess(np.repeat(grey[..., None], 3, -1))[0])


# 400x200: pad (0, 60) -> 400x320; scale 224/320 = 0.7 -> 280x224; crop x from 28.
@pytest.mark.parametrize(
    "box, want",
    [
        ([100, 50, 200, 150], [42, 77, 112, 147]),  # inside: ((x+0)*0.7-28, (y+60)*0.7)
        ([10, 0, 100, 100], [0, 42, 42, 112]),  # left part cropped away: x1 = 7-28 < 0 -> 0
        ([0, 0, 400, 200], [0, 42, 224, 182]),  # whole image: clipped to the crop, pad rows excluded
        ([370, 20, 400, 80], None),  # fully in the cropped-away right strip (x1 -> 231 > 224)
        ([360, 20, 400, 80], [223, 56, 224, 98]),  # x1 = 360*0.7-28 is 223.99999999999997 in floats, as released
        ([0, 0, 40, 100], None),  # fully in the left strip (x2 -> 0)
        ([101, 51, 102.5, 52], [42, 77, 43, 78]),  # corners truncated: 42.7 -> 42, 78.4 -> 78
    ],
)
def test_transform_box_400x200(box, want):
    got = ops.transform_box(box, (400, 200))
    if want is None:
        assert got is None
    else:
        np.testing.assert_array_equal(got, want)
    _, got2 = ops.preprocess(_image(400, 200), box)
    assert (got2 is None) == (want is None)


def test_transform_box_tall_and_unpadded():
    # 200x400 (tall): pad (60, 0) -> 320x400; scale 0.7 -> 224x280; crop y from 28.
    np.testing.assert_array_equal(ops.transform_box([50, 100, 150, 200], (200, 400)), [77, 42, 147, 112])
    # 448x400 (ratio 1.12, no pad): scale 224/400 = 0.56 -> 250x224 (int(250.88)); crop x from 13.0.
    np.testing.assert_array_equal(ops.transform_box([100, 100, 300, 200], (448, 400)), [43, 56, 155, 112])
    assert ops.transform_box(None, (448, 400)) is None
