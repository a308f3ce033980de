"""Training and evaluating on cached frozen-encoder tokens: ``config.train.cache_frozen_vision = True``.

A frozen vision encoder on unaugmented images gives every image the same tokens at every step, so computing them
inside each train step (twice per example: reference and target) repeats work. With the switch on, one pass
before the first step (`FrozenFeatureCache.compute`, called through ``OacirTask.prepare_training`` by the trainer
once the weights are loaded or restored) encodes every train and val image with the model's own encoder program
(`FeatureEncoder.vision`, in the encoder's compute dtype: bfloat16 under ``config.precision = "bf16"``), and
training steps start at ``ln_vision`` (which trains) on the cached tokens. The evaluation reads the val tokens of
the same pass, so train and eval see the same encoder numbers.

What stays the same: the examples and their order (the pipeline's `training_order`, at ``data.num_workers = 0``:
worker processes are not needed to look up rows), the text, the boxes, the loss. A batch carries ``ref_tokens``
and ``tgt_tokens`` [b, N, D] instead of ``ref_pixels`` and ``tgt_pixels``. Refused (`check_cacheable`) where the
tokens would not be fixed: a trainable encoder or augmentation. Memory: the tokens live in memory-mapped files
under ``$TMPDIR`` (``frozen_tokens``); every process computes all of them.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import ml_collections
import numpy as np

from idmr_jax.data import text
from idmr_jax.tasks.oacir import evaluate, frozen_tokens, pipeline

TEXT_CHUNK = 4096  # queries tokenised per call


def check_cacheable(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming every reason, unless each image's frozen tokens are fixed for the whole run."""
    reasons = []
    if not config.model.freeze_vision:
        reasons.append("the vision encoder trains (model.freeze_vision=False), so its tokens change every step")
    if config.data.get("augment", False):
        reasons.append("augmentation is on (data.augment=True), so an image's tokens differ each time it is seen")
    if config.data.source not in ("arrayrecord", "demo"):
        reasons.append(f"data.source={config.data.source!r}: the cache reads converted OACIRR shards "
                       "('arrayrecord', or 'demo')")
    if reasons:
        raise ValueError("config.train.cache_frozen_vision=True needs fixed frozen-encoder tokens, but "
                         + "; ".join(reasons) + ". Turn the cache off (--config.train.cache_frozen_vision=False).")


@dataclasses.dataclass
class TrainTables:
    """Per-query model inputs of the train folder, by global query key (rows of ``folder.tokens``)."""

    folder: frozen_tokens.FolderTokens
    target_rows: np.ndarray  # int64 [num_queries]
    input_ids: np.ndarray  # int32 [num_queries, L]
    attention_mask: np.ndarray  # int32 [num_queries, L]

    def batch(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """The training batch of the query keys `keys` (the uncached pipeline's keys, `example_id` included)."""
        tokens = self.folder.tokens
        return {"ref_tokens": np.asarray(tokens[self.folder.ref_rows[keys]]),
                "tgt_tokens": np.asarray(tokens[self.target_rows[keys]]),
                "input_ids": self.input_ids[keys], "attention_mask": self.attention_mask[keys],
                "box_mask": self.folder.box_masks[keys], "example_id": keys.astype(np.int32)}


def train_tables(enc: evaluate.FeatureEncoder, config: ml_collections.ConfigDict,
                 spec: pipeline.ImageSpec) -> TrainTables:
    """Frozen tokens, targets, text and boxes of every training query (the uncached `pipeline.TrainExample`'s)."""
    d = config.data
    folder = frozen_tokens.encode_folder(enc, d.train_dir, spec, roi_crop=d.roi_crop)
    targets = np.array([q.target_gallery_index for q in folder.queries], np.int64)
    for q, t in zip(folder.queries, targets):
        if not (0 <= t < len(folder.gallery) and folder.gallery[t].name == q.target_name):
            raise ValueError(f"query {q.reference_name!r}: target_gallery_index {t} does not point at "
                             f"{q.target_name!r}")
    tokenizer = text.Tokenizer(d.tokenizer, d.max_text_len)
    texts = [pipeline.query_text(q, text_entity=d.text_entity) for q in folder.queries]
    parts = [tokenizer(texts[i:i + TEXT_CHUNK]) for i in range(0, len(texts), TEXT_CHUNK)]
    return TrainTables(folder=folder, target_rows=targets, input_ids=np.concatenate([p[0] for p in parts]),
                       attention_mask=np.concatenate([p[1] for p in parts]))


class CachedTrainIterator:
    """Training batches from `TrainTables` in the uncached pipeline's order; its state (the position) is saved with
    every checkpoint like the Grain iterator's. The tables arrive with `attach`, before the first batch."""

    def __init__(self, config: ml_collections.ConfigDict, num_queries: int):
        self._order, self._plan = pipeline.training_order(config, num_queries)
        self.steps_per_epoch = self._plan.steps_per_epoch
        self._position = 0  # index in the order of the next example
        self.tables: TrainTables | None = None

    def attach(self, tables: TrainTables) -> None:
        self.tables = tables

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.tables is None:
            raise RuntimeError("the frozen-token cache is empty: call the task's prepare_training(model) before the "
                               "first batch (the trainer does)")
        b = self._plan.local_batch
        keys = np.array([self._order[i] for i in range(self._position, self._position + b)], np.int64)
        self._position += b
        return self.tables.batch(keys)

    def get_state(self) -> dict:
        return {"position": self._position}

    def set_state(self, state: dict) -> None:
        self._position = int(state["position"])


class FrozenFeatureCache:
    """The switch's state for one run: the training iterator and, after `compute`, the train and val tokens."""

    def __init__(self, config: ml_collections.ConfigDict, spec: pipeline.ImageSpec):
        check_cacheable(config)
        self.config, self.spec = config, spec
        self.val_tokens: dict[str, frozen_tokens.FolderTokens] = {}
        self._iterator: CachedTrainIterator | None = None

    def train_iterator(self) -> CachedTrainIterator:
        """The training iterator (empty until `compute`)."""
        from idmr_jax.data.grain_io import RecordReader, list_shards

        if self._iterator is None:
            pipeline.check_train_dir(self.config)
            queries = RecordReader(list_shards(self.config.data.train_dir, pipeline.QUERY_GLOB))
            self._iterator = CachedTrainIterator(self.config, len(queries))
        return self._iterator

    def compute(self, model) -> None:
        """Encodes every train image (and every val image, when the run evaluates) with `model`'s frozen encoder.

        Call with the weights the run trains from (loaded or restored). `model` is not kept: its arrays may be
        donated to the train step afterwards."""
        start = time.perf_counter()
        enc = evaluate.FeatureEncoder.from_config(model, self.config)
        tables = train_tables(enc, self.config, self.spec)
        self.train_iterator().attach(tables)
        e = self.config.get("eval")
        if e and e.get("at_end", True):
            for folder in [f for f in (self.config.data.val_dir or "").split(",") if f]:
                self.val_tokens[folder] = evaluate.folder_tokens(enc, folder, self.config, self.spec)
        rows = len(tables.folder.tokens) + sum(len(t.tokens) for t in self.val_tokens.values())
        if jax.process_index() == 0:
            print(f"frozen-encoder tokens of {rows} images cached in {time.perf_counter() - start:.1f} s")

    def close(self) -> None:
        """Removes the token files."""
        for folder in self.val_tokens.values():
            folder.close()
        if self._iterator is not None and self._iterator.tables is not None:
            self._iterator.tables.folder.close()
