"""M_B rasterisation (hand-computed and vs. the released loop rule) and box perturbations."""

import math

import jax
import numpy as np
import pytest

from idmr_jax.data import boxes as B


def _tokens(mask):
    return sorted(np.flatnonzero(mask).tolist())


def _released_rule(box, g=16, p=14):
    """The released loop over integer boxes: cols x1//p .. (x2+p-1)//p, clipped, token row*g+col+1."""
    mask = np.zeros(1 + g * g, np.float32)
    if box is None:
        return mask
    for i in range(max(0, box[1] // p), min(g, (box[3] + p - 1) // p)):
        for j in range(max(0, box[0] // p), min(g, (box[2] + p - 1) // p)):
            mask[i * g + j + 1] = 1.0
    return mask


@pytest.mark.parametrize(
    "box, tokens",
    [
        ([0, 0, 14, 14], [1]),  # exactly patch (0, 0)
        ([14, 14, 28, 28], [18]),  # patch (1, 1) -> 1*16 + 1 + 1
        ([13, 0, 15, 1], [1, 2]),  # straddles the col 0 / col 1 border
        ([210, 210, 224, 224], [256]),  # last patch
        ([200, 200, 300, 300], [239, 240, 255, 256]),  # runs off the image: clipped to rows/cols 14-15
        ([20, 20, 20, 40], [18, 34]),  # zero width inside a patch still marks that column (released rule)
        ([28, 0, 28, 14], []),  # zero width on a patch border marks nothing
    ],
)
def test_patch_mask_16x16(box, tokens):
    mask = B.box_to_patch_mask(box, (16, 16), (224, 224), patch=14)
    assert mask.shape == (257,) and mask.dtype == np.float32
    assert _tokens(mask) == tokens
    np.testing.assert_array_equal(mask, _released_rule(box))


def test_patch_mask_full_and_none():
    for patch in (14, None):
        full = B.box_to_patch_mask([0, 0, 224, 224], (16, 16), (224, 224), patch=patch)
        assert full[0] == 0 and full[1:].sum() == 256
        none = B.box_to_patch_mask(None, (16, 16), (224, 224), patch=patch)
        np.testing.assert_array_equal(none, np.zeros(257, np.float32))


def test_patch_mask_scaled_grids():
    """patch=None: grids that are not patch grids; the box is scaled to the grid."""
    # 4x4 grid on 224 (cells of 56): cols 0..ceil(120/56)=3, rows floor(60/56)=1..ceil(170/56)=4.
    m = B.box_to_patch_mask([50, 60, 120, 170], grid=(4, 4), image_size=(224, 224), patch=None)
    assert m.shape == (17,)
    assert _tokens(m) == [r * 4 + c + 1 for r in (1, 2, 3) for c in (0, 1, 2)]
    # 2x3 grid on H=100, W=150 (50x50 cells): cols 1, 2 and row 0.
    assert _tokens(B.box_to_patch_mask([60, 10, 140, 40], grid=(2, 3), image_size=(100, 150), patch=None)) == [2, 3]
    # 4x2 grid on 64x64 (cells 16 high, 32 wide): col 0, rows 1 and 2 -> tokens 1*2+1, 2*2+1.
    assert _tokens(B.box_to_patch_mask([0, 20, 10, 40], grid=(4, 2), image_size=(64, 64), patch=None)) == [3, 5]
    # Non-integer cells (224/3): 75 is just past the first border 74.67 -> cols 1 and 2.
    assert _tokens(B.box_to_patch_mask([75, 0, 224, 10], grid=(3, 3), image_size=(224, 224), patch=None)) == [2, 3]
    # The demo's EfficientNet: 224 px, stride-16 map 14x14; [20, 0, 40, 10] -> cols 1..ceil(2.5)=3, row 0.
    assert _tokens(B.box_to_patch_mask([20, 0, 40, 10], grid=(14, 14), image_size=(224, 224), patch=None)) == [2, 3]


# 230 px with patch 14: a 16x16 grid (230 // 14) of 14-px patches; the last 6 px belong to no patch.
ODD_GRID, ODD_SIZE = (16, 16), (230, 230)


@pytest.mark.parametrize(
    "box, patch_tokens, scaled_tokens",
    [
        # cols 200//14=14 .. ceil(215/14)=16 -> 14, 15; scaled: floor(200*16/230)=13 .. ceil(215*16/230)=15 -> 13, 14.
        ([200, 0, 215, 14], [15, 16], [14, 15]),
        # Only the 6 px past the last patch: no patch (14*16 = 224 <= 225); scaled: col floor(225*16/230) = 15.
        ([225, 0, 230, 5], [], [16]),
        # rows 20//14=1 .. ceil(30/14)=3 -> 1, 2; scaled: floor(20*16/230)=1 .. ceil(30*16/230)=ceil(2.09)=3 -> 1, 2.
        ([0, 20, 10, 30], [17, 33], [17, 33]),
    ],
)
def test_patch_rule_and_scaled_rule_on_an_image_that_is_not_whole_patches(box, patch_tokens, scaled_tokens):
    assert _tokens(B.box_to_patch_mask(box, ODD_GRID, ODD_SIZE, patch=14)) == patch_tokens
    assert _tokens(B.box_to_patch_mask(box, ODD_GRID, ODD_SIZE, patch=None)) == scaled_tokens
    # The patch rule is the released loop rule (x // p .. ceil(x2 / p)) at any size.
    np.testing.assert_array_equal(B.box_to_patch_mask(box, ODD_GRID, ODD_SIZE, patch=14), _released_rule(box))


def test_every_encoder_gets_its_rule():
    """ViT specs rasterise with their patch, the demo's EfficientNet with the scaled rule (its numbers unchanged)."""
    from configs import oacir
    from idmr_jax.tasks.oacir.pipeline import image_spec
    from idmr_jax.tasks.oacir.task import model_config

    assert image_spec(model_config(oacir.get_config("tiny"))).patch == 14
    assert image_spec(model_config(oacir.get_config(""))).patch == 14
    demo = image_spec(model_config(oacir.get_config("demo")))
    assert (demo.size, demo.grid, demo.patch) == (224, (14, 14), None)


def test_patch_mask_matches_released_rule_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = sorted(rng.integers(0, 225, 2).tolist())
        y1, y2 = sorted(rng.integers(0, 225, 2).tolist())
        mask = B.box_to_patch_mask([x1, y1, x2, y2], (16, 16), (224, 224), patch=14)
        np.testing.assert_array_equal(mask, _released_rule([x1, y1, x2, y2]))
        # 224 px is a whole number of patches: both rules agree.
        np.testing.assert_array_equal(mask, B.box_to_patch_mask([x1, y1, x2, y2], (16, 16), (224, 224), patch=None))


@pytest.mark.parametrize("grid, size, patch", [((16, 16), (224, 224), 14), ((16, 16), (224, 224), None),
                                               ((4, 6), (64, 90), None), ((3, 3), (224, 224), None),
                                               ((16, 16), (230, 230), 14), ((16, 16), (230, 230), None),
                                               ((4, 6), (64, 90), 15)])
def test_batched_mask_matches_numpy_under_jit(grid, size, patch):
    rng = np.random.default_rng(1)
    h, w = size
    n = 32
    xs = np.sort(rng.uniform(-10, w + 10, (n, 2)), axis=1)
    ys = np.sort(rng.uniform(-10, h + 10, (n, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
    boxes[:8] = np.round(boxes[:8])  # integer boxes too, including exact patch borders
    valid = rng.random(n) < 0.8
    boxes[~valid] = np.nan  # ignored when invalid
    fn = jax.jit(lambda b, v: B.box_to_patch_mask_batch(b, v, grid=grid, image_size=size, patch=patch))
    got = np.asarray(fn(boxes, valid))
    want = np.stack([B.box_to_patch_mask(b if v else None, grid, size, patch=patch) for b, v in zip(boxes, valid)])
    np.testing.assert_array_equal(got, want)


BOXES = [
    [50.0, 40.0, 150.0, 120.0],  # ordinary
    [0.0, 0.0, 60.0, 30.0],  # in a corner
    [5.0, 5.0, 195.0, 145.0],  # nearly the whole image: enlarging is infeasible -> shrink
    [180.0, 10.0, 200.0, 150.0],  # thin, on the right edge
]
IMAGE = (150, 200)  # (H, W)


@pytest.mark.parametrize("box", BOXES)
def test_perturbation_ious(box):
    h, w = IMAGE
    for seed in range(8):
        for mode, iou in (("scale", 0.8), ("scale_shift", 0.5)):
            out = B.perturb_box(box, mode, IMAGE, seed=(seed, 3))
            assert B.box_iou(out, box) == pytest.approx(iou, abs=1e-6), (mode, seed)
            assert out[0] >= 0 and out[1] >= 0 and out[2] <= w and out[3] <= h
            assert out[0] < out[2] and out[1] < out[3]


def test_perturbation_determinism_and_modes():
    box = BOXES[0]
    a = B.perturb_box(box, "scale_shift", IMAGE, seed=(0, 1))
    np.testing.assert_array_equal(a, B.perturb_box(box, "scale_shift", IMAGE, seed=(0, 1)))
    assert not np.allclose(a, B.perturb_box(box, "scale_shift", IMAGE, seed=(0, 2)))
    assert B.perturb_box(box, "none", IMAGE) is None
    assert B.perturb_box(None, "scale", IMAGE) is None
    np.testing.assert_array_equal(B.perturb_box(box, "exact", IMAGE), box)
    # Both directions of "scale" occur across seeds (enlarge and shrink).
    areas = {math.copysign(1, B._area(B.perturb_box(box, "scale", IMAGE, seed=s)) - B._area(box)) for s in range(8)}
    assert areas == {-1.0, 1.0}
    with pytest.raises(ValueError):
        B.perturb_box(box, "jitter", IMAGE)
    with pytest.raises(ValueError):
        B.perturb_box([10, 10, 10, 20], "scale", IMAGE)


def test_box_iou():
    assert B.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert B.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert B.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
