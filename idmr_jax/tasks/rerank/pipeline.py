"""Grain pipeline of the reranker's joint training (LamRA): training pairs -> pointwise and listwise prompts.

One example = one training pair (`idmr_jax.tasks.universal.records.TrainingPair`, e.g. shards written by
``python -m idmr_jax.mine`` with mined negatives) and yields three prompts:

    pointwise  (query, positive) -> "Yes"     (query, one of the pair's negatives) -> "No"
    listwise   (query, K candidates: the positive + K - 1 negatives, shuffled) -> the positive's number

K is drawn from ``min_k..max_k`` (2..5) per example. The negatives are the pair's own (a random subset when it
lists more); a pair with too few is topped up with random other pairs' positives, exactly as the embedder's
pipeline fills its hard-negative columns (`idmr_jax.tasks.universal.pipeline.PairExample.hard_negatives`).
The pointwise negative is one of the pair's own negatives when it has any.

Shapes are static: listwise prompts are padded to ``list_len`` tokens and always have ``max_k`` index slots (the
loss masks the slots beyond ``list_size``); each prompt has a fixed number of image slots (pointwise 2, listwise
``max_k + 1``: the query and every candidate) with validity flags for `splice_image_features`' ``image_valid``.
With ``images=False`` (text-only data) no pixels are produced and a side with an image is an error naming its
record. Batch keys (b = this process's rows):

    point_ids, point_mask   int32 [b, 2, point_len]    row 0: (query, positive), row 1: (query, negative)
    point_label             int32 [b, 2]               1 = "Yes", 0 = "No"
    point_pixels            float32 [b, 2, S, S, 3]    (images only) the prompts' images in placeholder order
    point_image_valid       bool [b, 2]                (images only) which image slots hold an image
    list_ids, list_mask     int32 [b, list_len]
    list_target             int32 [b]                  0-based number of the positive in the shown order
    list_size               int32 [b]                  K
    list_pixels             float32 [b, max_k + 1, S, S, 3], list_image_valid bool [b, max_k + 1]  (images only)
    example_id              int32 [b]                  the pair's global key (not a model input)
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from idmr_jax.data.grain_io import CheckpointableIterator
from idmr_jax.tasks.idmr.pipeline import pixels
from idmr_jax.tasks.rerank.prompts import (MAX_LIST, MIN_LIST, RerankPrompt, RerankPrompts, RerankTokenizer,
                                           listwise_example, load_rerank_prompts, pointwise_prompt, sample_list_size)
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.pipeline import PairExample, draw_instruction, pair_batches

POINT_ROWS = 2  # (query, positive) and (query, negative)
POINT_IMAGES = 2  # a pointwise prompt shows the query and one candidate


@dataclasses.dataclass(frozen=True)
class RerankLayout:
    """The static shapes of a training example (see the module docstring)."""

    point_len: int
    list_len: int
    images: bool
    image_size: int
    pad_ratio: float
    min_k: int = MIN_LIST
    max_k: int = MAX_LIST

    @property
    def list_images(self) -> int:
        return self.max_k + 1


def image_slots(prompt: RerankPrompt, slots: int, layout: RerankLayout, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels float32 [slots, S, S, 3], valid bool [slots]) of a prompt's images, in placeholder order."""
    size = layout.image_size
    out = np.zeros((slots, size, size, 3), np.float32)
    valid = np.zeros(slots, bool)
    if len(prompt.images) > slots:
        raise ValueError(f"{where}: {len(prompt.images)} images, more than its {slots} image slots")
    for j, image in enumerate(prompt.images):
        out[j] = pixels(image, size, layout.pad_ratio, source=f"{where} image {j}")
        valid[j] = True
    return out, valid


def cleaned(side: records.Side) -> records.Side:
    """A candidate side with its text cleaned as UniIR cleans it (`idmr_jax.tasks.universal.mbeir.uniir_text`)."""
    return side if side.text is None else dataclasses.replace(side, text=mbeir.uniir_text(side.text))


class RerankExample(grain.transforms.RandomMap):
    """Pair key -> the pair's pointwise and listwise training prompts (see the module docstring)."""

    def __init__(self, paths: list[str], tokenizers: dict[str, RerankTokenizer], prompts: RerankPrompts,
                 layout: RerankLayout, shard_glob: str):
        self.tokenizers, self.prompts, self.layout, self.shard_glob = tokenizers, prompts, layout, shard_glob
        # Its pair reading and negative drawing: max_k - 1 negatives per pair, the pair's own first.
        self.negatives = PairExample(paths, {}, {}, layout.image_size, layout.pad_ratio, layout.max_k - 1, shard_glob)

    def _encode(self, kind: str, prompt: RerankPrompt, slots: int, where: str) -> dict[str, np.ndarray]:
        ids, mask = self.tokenizers[kind].encode(prompt, what=where)
        out = {"ids": ids, "mask": mask}
        if self.layout.images:
            out["pixels"], out["image_valid"] = image_slots(prompt, slots, self.layout, where)
        elif prompt.images:
            raise ValueError(f"{where}: a side has an image but config.rerank.images is False (text-only training)")
        return out

    def random_map(self, key, rng: np.random.Generator) -> dict[str, np.ndarray]:
        key = int(key)
        where = f"{self.shard_glob} record {key}"
        pair = self.negatives.pair(key)
        instruction = draw_instruction(pair, rng)
        # As the embedder reads them: the query's text with an instruction, candidates' texts cleaned (UniIR).
        query = pair.query
        if query.text is not None or instruction:
            query = dataclasses.replace(query, text=mbeir.instructed_text(instruction, query.text))
        positive = cleaned(pair.positive)
        negatives = [cleaned(s) for s in self.negatives.hard_negatives(key, pair, rng)]
        own = min(len(pair.negatives), len(negatives))  # the pair's own negatives come first
        point_negative = negatives[int(rng.integers(own))] if own else negatives[0]
        k = sample_list_size(rng, self.layout.min_k, self.layout.max_k)
        listed = listwise_example(query, [positive, *negatives[:k - 1]], 0, rng, prompts=self.prompts)
        point = [self._encode("pointwise", pointwise_prompt(self.prompts, query, c), POINT_IMAGES,
                              f"{where} pointwise {name}")
                 for c, name in ((positive, "positive"), (point_negative, f"negative {point_negative.id!r}"))]
        out = {f"point_{k_}": np.stack([p[k_] for p in point]) for k_ in point[0]}
        out["point_label"] = np.array([1, 0], np.int32)
        out.update({f"list_{k_}": v for k_, v in self._encode("listwise", listed.prompt, self.layout.list_images,
                                                               f"{where} listwise").items()})
        out["list_target"], out["list_size"] = np.int32(listed.target), np.int32(k)
        out["example_id"] = np.int32(key)
        return out


def layout_of(task) -> RerankLayout:
    """The example layout of a `RerankTask`'s config (``data``, ``rerank``)."""
    d, r = task.config.data, task.config.rerank
    return RerankLayout(point_len=int(d.max_len), list_len=int(r.list_max_len), images=bool(r.images),
                        image_size=int(d.image_size), pad_ratio=float(d.pad_ratio), min_k=int(r.min_k),
                        max_k=int(r.k))


def tokenizers_of(task, layout: RerankLayout) -> dict[str, RerankTokenizer]:
    """The pointwise and listwise prompt tokenizers (the query prompt layout at each prompt's length)."""
    spec = task.prompt_spec("query")
    return {kind: RerankTokenizer(task.config.data.tokenizer, dataclasses.replace(spec, max_length=length))
            for kind, length in (("pointwise", layout.point_len), ("listwise", layout.list_len))}


def train_iterator(task) -> CheckpointableIterator:
    """Training iterator over ``data.train_dir/data.train_glob`` (this process's rows of each global batch)."""
    layout = layout_of(task)
    tokenizers = tokenizers_of(task, layout)
    prompts = load_rerank_prompts(task.config.rerank.prompt_set)
    return pair_batches(task.config, lambda paths, pattern: RerankExample(paths, tokenizers, prompts, layout, pattern))
