"""Grain pipeline over training pairs of any modality (`idmr_jax.tasks.universal.records.TrainingPair`).

One example = one pair: its query, its positive and ``data.num_hard_negatives`` hard negatives. Each side's prompt
is its side's template for its modality, drawn at random per example when the prompt set lists several
(`idmr_jax.tasks.universal.prompts`); a query's text is one of its instructions (drawn per example) joined to its
text as UniIR joins them, a candidate's text is cleaned the same way (`idmr_jax.tasks.universal.mbeir`).

Hard negatives travel with their query: the pair's own negatives (a random subset when it lists more than
``num_hard_negatives``). A pair listing fewer is topped up with the positives of random other pairs (random
negatives, as UniIR and MM-Embed use when mined ones run out), never with its own positive; so every query has the
same number of columns and the loss needs no mask.

A batch mixes modalities. Its images are packed per side (`PackImages`): the batch's rows are split into the
blocks that go to each device on the batch axes, and each block's images fill ``data.image_slots[side]`` slots in
row order (-1 = as many slots as rows: never too few; 0 = a text-only side, no pixels at all). The vision tower
then runs on the slots only, and `idmr_jax.tasks.universal.model.rows_from_slots` gives each row its features
without crossing devices. Batch keys, per side ``p`` in query / cand / hn (hard negatives with an extra ``Nh`` axis
after the batch's):

    {p}_ids, {p}_mask       int32 [b, L]        prompt tokens (`idmr_jax.tasks.idmr.pipeline.PromptSpec` layout)
    {p}_has_image           bool  [b]           the row has an image
    {p}_pixels              float32 [k * S, H, W, 3]   the packed image slots of the k local device blocks
                                                (absent when the side's slots are 0)
    example_id              int32 [b]           the pair's global key (not a model input)

Order and resumption are those of the other tasks' pipelines (`idmr_jax.data.grain_io`).
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np

from idmr_jax.data.grain_io import (CheckpointableIterator, RecordReader, batched_iterator, check_worker_count,
                                    plan_process)
from idmr_jax.data.records import shard_paths
from idmr_jax.losses.similarity import BATCH_AXES
from idmr_jax.tasks.idmr.pipeline import PromptTokenizer, pixels
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.prompts import load_prompt_set

SIDES = {"query": "query", "cand": "candidate", "hn": "candidate"}  # batch prefix -> prompt side


def pack_images(pixels_rows: np.ndarray, has_image: np.ndarray, num_blocks: int, slots: int, *, side: str
                ) -> np.ndarray:
    """The image slots ``[num_blocks * slots, H, W, 3]`` of rows ``[R, H, W, 3]``: block j (rows
    ``j*R/num_blocks ...``) puts its rows with an image, in row order, into its slots; unused slots are zeros.
    ValueError naming `side` when a block holds more images than `slots`."""
    rows = has_image.shape[0]
    per_block = rows // num_blocks
    out = np.zeros((num_blocks * slots, *pixels_rows.shape[1:]), pixels_rows.dtype)
    for j in range(num_blocks):
        own = np.flatnonzero(has_image[j * per_block:(j + 1) * per_block]) + j * per_block
        if len(own) > slots:
            raise ValueError(f"side {side!r}: {len(own)} images in the batch block of device {j}, more than its "
                             f"{slots} image slots: raise config.data.image_slots.{side} (-1 = one per row)")
        out[j * slots:j * slots + len(own)] = pixels_rows[own]
    return out


class PackImages(grain.transforms.Map):
    """A batch of examples -> the model's batch: each side's images packed into its slots (`pack_images`)."""

    def __init__(self, num_blocks: int, slots: dict[str, int]):
        self.num_blocks, self.slots = num_blocks, slots

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        for prefix in SIDES:
            if f"{prefix}_has_image" not in batch:
                continue
            has = batch[f"{prefix}_has_image"].reshape(-1)
            rows_pixels = out.pop(f"{prefix}_pixels")
            per_block = has.shape[0] // self.num_blocks
            slots = self.slots[prefix] if self.slots[prefix] >= 0 else per_block
            if slots == 0:
                if has.any():
                    raise ValueError(f"side {prefix!r} has image rows but config.data.image_slots.{prefix} is 0 "
                                     "(a text-only side)")
                continue
            out[f"{prefix}_pixels"] = pack_images(rows_pixels.reshape(-1, *rows_pixels.shape[-3:]), has,
                                                  self.num_blocks, slots, side=prefix)
        return out


def draw_instruction(pair: records.TrainingPair, rng: np.random.Generator) -> str | None:
    """One of the pair's instructions, drawn per example (None when it has none)."""
    return pair.instruction_set[rng.integers(len(pair.instruction_set))] if pair.instruction_set else None


class PairExample(grain.transforms.RandomMap):
    """Pair key -> one example: prompts tokenised, images decoded, hard negatives drawn (see the module docstring)."""

    def __init__(self, paths: list[str], tokenizers: dict[str, PromptTokenizer], prompt_set: dict, image_size: int,
                 pad_ratio: float, num_hard_negatives: int, shard_glob: str):
        self.reader = RecordReader(paths)
        self.tokenizers, self.prompt_set = tokenizers, prompt_set
        self.image_size, self.pad_ratio = image_size, pad_ratio
        self.num_hard_negatives, self.shard_glob = num_hard_negatives, shard_glob

    def pair(self, key: int) -> records.TrainingPair:
        """The training pair of a global key; ValueError naming the shards, the record and the field."""
        try:
            return records.decode_pair(self.reader.raw(key))
        except records.RecordError as e:
            raise ValueError(f"{self.shard_glob} record {key}: {e}") from e

    def _side(self, side: records.Side, prompt_side: str, text: str, rng: np.random.Generator, where: str) -> dict:
        templates = self.prompt_set[prompt_side][side.modality]
        template = templates[rng.integers(len(templates))] if len(templates) > 1 else templates[0]
        ids, mask = self.tokenizers[prompt_side].encode(template.format(text=text), what=f"{where} field 'text'")
        size = self.image_size
        if side.image is None:
            image, has = np.zeros((size, size, 3), np.float32), False
        else:
            image, has = pixels(side.image, size, self.pad_ratio, source=f"{where} field 'image'"), True
        return {"ids": ids, "mask": mask, "pixels": image, "has_image": np.bool_(has)}

    def hard_negatives(self, key: int, pair: records.TrainingPair, rng: np.random.Generator) -> list[records.Side]:
        """The pair's `num_hard_negatives` hard negatives (see the module docstring)."""
        own = list(pair.negatives)
        if len(own) > self.num_hard_negatives:
            return [own[i] for i in sorted(rng.choice(len(own), self.num_hard_negatives, replace=False))]
        taken = {pair.positive.id, *(n.id for n in own)}
        n = len(self.reader)
        for _ in range(100 * self.num_hard_negatives):  # random other pairs' positives fill the rest
            if len(own) == self.num_hard_negatives:
                break
            other = int(rng.integers(n))
            if other != key and (side := self.pair(other).positive).id not in taken:
                own.append(side)
                taken.add(side.id)
        if len(own) < self.num_hard_negatives:
            raise ValueError(f"{self.shard_glob}: too few distinct candidates to fill {self.num_hard_negatives} hard "
                             f"negatives for record {key}")
        return own

    def random_map(self, key, rng: np.random.Generator) -> dict[str, np.ndarray]:
        key = int(key)
        where = f"{self.shard_glob} record {key}"
        pair = self.pair(key)
        instruction = draw_instruction(pair, rng)
        sides = {"query": self._side(pair.query, "query", mbeir.instructed_text(instruction, pair.query.text), rng,
                                     f"{where} query"),
                 "cand": self._side(pair.positive, "candidate", mbeir.uniir_text(pair.positive.text), rng,
                                    f"{where} positive")}
        out = {f"{p}_{k}": v for p, side in sides.items() for k, v in side.items()}
        if self.num_hard_negatives:
            negs = [self._side(s, "candidate", mbeir.uniir_text(s.text), rng, f"{where} negative {s.id!r}")
                    for s in self.hard_negatives(key, pair, rng)]
            out.update({f"hn_{k}": np.stack([n[k] for n in negs]) for k in negs[0]})
        out["example_id"] = np.int32(key)
        return out


def batch_shards(mesh) -> int:
    """Devices the global batch is split over (the mesh's batch axes): the image slots' packing unit."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def local_batch_blocks(config) -> int:
    """The device blocks one process's rows of the batch split into."""
    from idmr_jax import sharding

    return batch_shards(sharding.mesh_from_config(config)) // jax.process_count()


def pair_batches(config, make_example, *, batch_map=None) -> CheckpointableIterator:
    """The batches of this process from the training pairs in ``data.train_dir/data.train_glob``: the keys shuffled
    per epoch, each turned into an example by ``make_example(shard paths, shard pattern)`` (a Grain ``RandomMap``,
    seeded by ``data.shuffle_seed``), batched, then ``batch_map`` over whole batches. Shared by every task that
    trains on pairs (this one, the rerankers)."""
    d = config.data
    if not d.train_dir:
        raise ValueError("config.data.train_dir is empty: point it at training pairs (python -m data_prep.instructcir, "
                         "data_prep.mbeir_pairs, or idmr_jax.mine)")
    pattern = os.path.join(d.train_dir, d.train_glob)
    paths = shard_paths(pattern)
    check_worker_count(d.num_workers, len(paths), remedy="convert with more shards")
    n = len(RecordReader(paths))
    plan = plan_process(n, d.batch_size, what=f"training pairs ({pattern})")
    ds = grain.MapDataset.range(n)[plan.keys].shuffle(seed=d.shuffle_seed).repeat()
    ds = ds.random_map(make_example(paths, pattern), seed=d.shuffle_seed)
    return batched_iterator(ds, plan, num_workers=d.num_workers, read_threads=d.get("read_threads", 2),
                            batch_map=batch_map)


def train_iterator(task) -> CheckpointableIterator:
    """Training iterator of the universal task (this process's rows of each global batch; keys in the module
    docstring)."""
    d = task.config.data
    tokenizers = {side: PromptTokenizer(d.tokenizer, task.prompt_spec(side)) for side in ("query", "candidate")}
    prompt_set = load_prompt_set(d.get("prompt_set", ""))

    def make_example(paths, pattern):
        return PairExample(paths, tokenizers, prompt_set, d.image_size, d.pad_ratio, d.num_hard_negatives, pattern)

    slots = {p: int(d.image_slots[p]) for p in SIDES}
    return pair_batches(task.config, make_example, batch_map=PackImages(local_batch_blocks(task.config), slots))
