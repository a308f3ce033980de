"""Training augmentation: the reference's box mask follows its image through a flip; runs are reproducible."""

import numpy as np

from idmr_jax.data.boxes import box_to_patch_mask
from idmr_jax.tasks.oacir.pipeline import Augment


def _element():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(56, 56, 3)).astype(np.float32)
    return {"ref_pixels": ref, "tgt_pixels": rng.normal(size=(56, 56, 3)).astype(np.float32),
            "box_mask": box_to_patch_mask([0, 0, 14, 28], (4, 4), (56, 56), patch=14), "input_ids": np.arange(4)}


def test_flip_moves_the_mask_with_the_image():
    el = _element()
    seen = set()
    for seed in range(16):
        out = Augment((4, 4), jitter=0.0).random_map(el, np.random.default_rng(seed))
        flipped = np.allclose(out["ref_pixels"], el["ref_pixels"][:, ::-1])
        assert flipped or np.allclose(out["ref_pixels"], el["ref_pixels"])
        expected = el["box_mask"][1:].reshape(4, 4)[:, ::-1] if flipped else el["box_mask"][1:].reshape(4, 4)
        np.testing.assert_array_equal(out["box_mask"][1:].reshape(4, 4), expected)
        assert out["box_mask"][0] == 0.0  # CLS is never biased
        np.testing.assert_array_equal(out["input_ids"], el["input_ids"])
        seen.add(flipped)
    assert seen == {True, False}


def test_same_rng_same_augmentation_and_jitter_bounded():
    el = _element()
    a = Augment((4, 4)).random_map(el, np.random.default_rng(7))
    b = Augment((4, 4)).random_map(el, np.random.default_rng(7))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ratio = np.std(a["tgt_pixels"]) / np.std(el["tgt_pixels"])
    assert 0.85 < ratio < 1.15
