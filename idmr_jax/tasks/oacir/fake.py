"""Synthetic OACIR batches of the right shapes and dtypes (``--config.data.source=fake``).

A fixed pool of examples is cycled through in a seeded order, so training on it can visibly learn (the loss
falls as the pool is memorised), runs are reproducible, and the iterator state is one integer. Each example is
a reference image with a box, a tokenised modification text and a target image that shares the boxed region
with the reference (the "same instance" in a new context).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from idmr_jax.data.boxes import box_to_patch_mask
from idmr_jax.data.grain_io import process_batch_rows

CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    pool: int = 64
    image_size: int = 56
    patch_size: int = 14
    text_len: int = 32
    vocab_size: int = 30522
    seed: int = 0


def make_pool(spec: FakeSpec) -> dict[str, np.ndarray]:
    """The synthetic examples: reference/target pixels, tokens, box masks, instance ids."""
    rng = np.random.default_rng(spec.seed)
    n, s, g = spec.pool, spec.image_size, spec.image_size // spec.patch_size

    def blocky(count: int, size: int) -> np.ndarray:
        # Patch-sized blocks of colour plus a little noise: unlike white noise, two such images differ in their
        # average patch, so even a random frozen encoder gives them distinct features.
        cells = rng.normal(size=(count, -(-size // spec.patch_size), -(-size // spec.patch_size), 3))
        up = cells.repeat(spec.patch_size, axis=1).repeat(spec.patch_size, axis=2)[:, :size, :size]
        return (up + 0.1 * rng.normal(size=up.shape)).astype(np.float32)

    instances = blocky(n // 2 + 1, s // 2)
    ref = blocky(n, s)
    # The target shares the reference's scene faintly and the instance exactly (moved): learnable, not trivial.
    tgt = (0.5 * ref + 0.85 * blocky(n, s)).astype(np.float32)
    boxes = np.zeros((n, 4), np.float32)
    masks = np.zeros((n, 1 + g * g), np.float32)
    instance_ids = np.arange(n) // 2  # two queries per instance, so R_ID differs from R
    for i in range(n):
        patch = instances[instance_ids[i]]
        y, x = rng.integers(0, s - patch.shape[0] + 1, size=2)
        ref[i, y:y + patch.shape[0], x:x + patch.shape[1]] = patch
        ty, tx = rng.integers(0, s - patch.shape[0] + 1, size=2)
        tgt[i, ty:ty + patch.shape[0], tx:tx + patch.shape[1]] = patch
        boxes[i] = (x, y, x + patch.shape[1], y + patch.shape[0])
        if i % 4 != 3:  # every fourth query has no box: its mask stays zero and beta has no effect
            masks[i] = box_to_patch_mask(boxes[i], (g, g), (s, s), patch=spec.patch_size)
    ids = np.full((n, spec.text_len), PAD_ID, np.int32)
    att = np.zeros((n, spec.text_len), np.int32)
    for i in range(n):
        length = int(rng.integers(4, spec.text_len + 1))
        ids[i, 0], ids[i, length - 1] = CLS_ID, SEP_ID
        ids[i, 1:length - 1] = rng.integers(1000, spec.vocab_size, size=length - 2)
        att[i, :length] = 1
    return dict(ref_pixels=ref, tgt_pixels=tgt, input_ids=ids, attention_mask=att, box_mask=masks,
                boxes=boxes, instance=instance_ids.astype(np.int32))


TRAIN_KEYS = ("ref_pixels", "tgt_pixels", "input_ids", "attention_mask", "box_mask")


class FakeIterator:
    """Endless seeded iterator over the pool; yields this process's rows of each global batch."""

    def __init__(self, spec: FakeSpec, global_batch: int, process_index: int = 0, process_count: int = 1):
        self.rows = process_batch_rows(global_batch, process_index, process_count)
        self.spec, self.global_batch = spec, global_batch
        self.pool = make_pool(spec)
        self.position = 0  # global examples consumed so far
        self.steps_per_epoch = max(spec.pool // global_batch, 1)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.spec.seed, epoch]).permutation(self.spec.pool)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = np.array([self._order(p // self.spec.pool)[p % self.spec.pool]
                        for p in range(self.position, self.position + self.global_batch)])
        self.position += self.global_batch
        return {k: self.pool[k][idx[self.rows]] for k in TRAIN_KEYS}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])
