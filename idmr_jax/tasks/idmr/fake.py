"""Synthetic IDMR triplets of the right shapes (``config.data.source == "fake"``): tests and smoke runs.

A pool of (instance, scene) examples: each scene is a blocky background, each instance a blocky patch pasted at a
random place; an instance appears in ``scenes_per_instance`` different scenes. The "caption" names the scene (a
scene word, a position word, filler), the crop is the instance patch enlarged to the image size. So, as in IDMR,
the query (crop + caption) identifies its target only through both the instance and the scene.

Training rows are same-image triplets; optional hard negatives are the same instance in another scene (the
hardest distractor for an instance retriever). Evaluation queries pair an instance's crop from one scene with the
caption of another scene, against a gallery of every full image. The iterator state is one integer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from idmr_jax.data.grain_io import process_batch_rows
from idmr_jax.tasks.idmr.pipeline import PromptSpec, assemble


@dataclasses.dataclass(frozen=True)
class FakeTripletSpec:
    prompt: PromptSpec
    image_size: int = 56
    instances: int = 16
    scenes: int = 8
    scenes_per_instance: int = 2
    caption_len: int = 6
    vocab_size: int = 64  # token ids of caption words are drawn from [4, vocab_size) minus the special ids
    num_hard_negatives: int = 0
    seed: int = 0


def _blocky(rng, count, size, block):
    cells = rng.normal(size=(count, -(-size // block), -(-size // block), 3))
    up = cells.repeat(block, axis=1).repeat(block, axis=2)[:, :size, :size]
    return (up + 0.1 * rng.normal(size=up.shape)).astype(np.float32)


def make_pool(spec: FakeTripletSpec) -> dict[str, np.ndarray]:
    """Arrays over the pool's examples: image, crop [n,S,S,3], caption ids [n,L] / mask, instance, scene [n]."""
    rng = np.random.default_rng(spec.seed)
    s, p = spec.image_size, spec.image_size // 2
    block = max(spec.image_size // 8, 1)
    scenes = _blocky(rng, spec.scenes, s, block)
    patches = _blocky(rng, spec.instances, p, block)
    inst = np.repeat(np.arange(spec.instances), spec.scenes_per_instance)
    scene = np.concatenate([rng.choice(spec.scenes, spec.scenes_per_instance, replace=False)
                            for _ in range(spec.instances)])
    n = len(inst)
    images = scenes[scene].copy()
    specials = {spec.prompt.image_token_id, spec.prompt.pad_id, spec.prompt.bos_id, spec.prompt.eos_id}
    words = np.array([w for w in range(4, spec.vocab_size) if w not in specials])
    scene_word = words[np.arange(spec.scenes) % len(words)]
    position_word = words[-9:]
    ids = np.zeros((n, spec.prompt.max_length), np.int32)
    mask = np.zeros_like(ids)
    for i in range(n):
        y, x = rng.integers(0, s - p + 1, size=2)
        images[i, y:y + p, x:x + p] = patches[inst[i]]
        cell = 3 * min(int(3 * (y + p / 2) / s), 2) + min(int(3 * (x + p / 2) / s), 2)
        caption = [scene_word[scene[i]], position_word[cell]] + list(rng.choice(words, spec.caption_len - 2))
        ids[i], mask[i] = assemble([None, caption], spec.prompt)
    crops = patches.repeat(2, axis=1).repeat(2, axis=2)[:, :s, :s]
    crops = np.pad(crops, ((0, 0), (0, s - crops.shape[1]), (0, s - crops.shape[2]), (0, 0)))[inst]
    crops = (crops + 0.05 * rng.normal(size=crops.shape)).astype(np.float32)
    cand_ids, cand_mask = assemble([None, []], spec.prompt)
    return dict(image=images, crop=crops, query_ids=ids, query_mask=mask,
                cand_ids=np.broadcast_to(cand_ids, ids.shape).copy(),
                cand_mask=np.broadcast_to(cand_mask, mask.shape).copy(),
                instance=inst.astype(np.int32), scene=scene.astype(np.int32))


def _other_scene(pool, i: int, k: int) -> int:
    """The k-th other example of i's instance (cyclic), i.e. the same instance in another scene."""
    same = np.flatnonzero(pool["instance"] == pool["instance"][i])
    pos = int(np.flatnonzero(same == i)[0])
    return int(same[(pos + 1 + k) % len(same)])


class FakeTripletIterator:
    """Endless seeded iterator over the pool; yields this process's rows of each global batch."""

    def __init__(self, spec: FakeTripletSpec, global_batch: int, process_index: int = 0, process_count: int = 1):
        self.rows = process_batch_rows(global_batch, process_index, process_count)
        if spec.num_hard_negatives >= spec.scenes_per_instance:
            raise ValueError(f"{spec.num_hard_negatives} hard negatives need more than that many scenes per "
                             f"instance, got {spec.scenes_per_instance}")
        self.spec, self.global_batch = spec, global_batch
        self.pool = make_pool(spec)
        self.n = len(self.pool["instance"])
        self.position = 0
        self.steps_per_epoch = max(self.n // global_batch, 1)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx = np.array([np.random.default_rng([self.spec.seed, p // self.n]).permutation(self.n)[p % self.n]
                        for p in range(self.position, self.position + self.global_batch)])[self.rows]
        self.position += self.global_batch
        pool = self.pool
        out = {"query_pixels": pool["crop"][idx], "query_ids": pool["query_ids"][idx],
               "query_mask": pool["query_mask"][idx], "cand_pixels": pool["image"][idx],
               "cand_ids": pool["cand_ids"][idx], "cand_mask": pool["cand_mask"][idx]}
        if self.spec.num_hard_negatives:
            hn = np.array([[_other_scene(pool, i, k) for k in range(self.spec.num_hard_negatives)] for i in idx])
            out |= {"hn_pixels": pool["image"][hn], "hn_ids": pool["cand_ids"][hn], "hn_mask": pool["cand_mask"][hn]}
        return out

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["position"])


def eval_arrays(spec: FakeTripletSpec) -> dict[str, np.ndarray]:
    """Queries (crop from one scene + caption of another scene of the instance) against every full image."""
    pool = make_pool(spec)
    n = len(pool["instance"])
    crop_of = np.array([_other_scene(pool, i, 0) for i in range(n)])
    return dict(query_pixels=pool["crop"][crop_of], query_ids=pool["query_ids"], query_mask=pool["query_mask"],
                gallery_pixels=pool["image"], gallery_ids=pool["cand_ids"], gallery_mask=pool["cand_mask"],
                targets=np.arange(n), gallery_instances=pool["instance"])
