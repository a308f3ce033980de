"""Grain pipelines over converted OACIRR shards (see `data_prep.oacirr` and `idmr_jax.data.records`).

Training:
    ArrayRecord query shards -> this process's share (ShardByJaxProcess) -> seeded shuffle, reseeded every
    epoch -> repeat -> decode + TargetPad(1.25)/resize/crop/CLIP-normalise (reference and target, the target
    read from the gallery shards by key) -> box through the same affine map -> patch mask -> BERT tokens
    (max 32) -> batches of this process's rows -> optional worker processes.
The iterator's state (``get_state``/``set_state``) is saved with every checkpoint, so a resumed run sees
exactly the examples an uninterrupted run would have seen.

Evaluation reads the val shards in order (no shuffle) through the same per-example transforms.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading

import grain
import numpy as np
from PIL import Image

from idmr_jax.data import image_ops, records, text
from idmr_jax.data.boxes import box_to_patch_mask, perturb_box

QUERY_GLOB = "queries-*.array_record"
GALLERY_GLOB = "gallery-*.array_record"
BOX_PERTURBATIONS = {"none": "exact", "iou0.8": "scale", "iou0.5": "scale_shift", "no_box": "none"}


def list_shards(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Paths of the shards matching `pattern` in `folder` (local or gs://: globbed with etils.epath), in sorted
    order (the order that gallery keys in query records refer to); an error naming the folder if none match."""
    from etils import epath

    paths = sorted(os.fspath(p) for p in epath.Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard matches {pattern!r} in {os.fspath(folder)!r}")
    return paths


def decode_image(data: bytes, *, source: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:  # noqa: BLE001 - a broken image names its record
        raise ValueError(f"{source}: image does not decode ({type(e).__name__}: {e})") from e


@dataclasses.dataclass
class ImageSpec:
    """Preprocessing geometry: square input `size`, TargetPad `pad_ratio`, the encoder's patch `grid`."""

    size: int
    grid: tuple[int, int]
    pad_ratio: float = 1.25


def reference_inputs(rec: records.QueryRecord, spec: ImageSpec, *, roi_crop: bool = False,
                     box_mode: str = "exact", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(pixels, patch mask [1+gh*gw], box in the 224 frame or None) for a query's reference image."""
    image = decode_image(rec.reference_image, source=f"query {rec.reference_name!r} field 'reference_image'")
    box = rec.reference_box
    if box is not None and box_mode != "exact":
        box = perturb_box(box, box_mode, (image.height, image.width), seed=(seed, rec.source_index))
    if roi_crop and box is not None:
        # ROI-cropped baseline: the model sees only the boxed region, and no box.
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        image, box = image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))), None
    pixels, final_box = image_ops.preprocess(image, box, spec.size, spec.pad_ratio)
    mask = box_to_patch_mask(final_box, spec.grid, (spec.size, spec.size))
    return pixels, mask, final_box


def query_text(rec: records.QueryRecord, *, text_entity: bool) -> str:
    t = text.blip_caption(rec.modification_text)
    return text.with_entity_prompt(t, rec.object_category, rec.source_index) if text_entity else t


class _RecordReader:
    """Random access to records of ArrayRecord shards by global key (shards concatenated in sorted order).

    Opened lazily and reopened after unpickling, so it travels into Grain's spawned workers; the open is locked
    because Grain calls map transforms from several reader threads.
    """

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self._source = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.paths, self._source, self._lock = state["paths"], None, threading.Lock()

    def _open(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def raw(self, key: int) -> bytes:
        return self._open()[int(key)]

    def __len__(self) -> int:
        return len(self._open())


class _GalleryReader(_RecordReader):
    """Gallery records by global key (the keys stored in query records)."""

    def __getitem__(self, key: int) -> records.GalleryRecord:
        return records.decode_gallery(self.raw(key))


class ReadQuery(grain.transforms.Map):
    """Global query key -> ``(key, record bytes)``: the key travels with the example as ``example_id``."""

    def __init__(self, query_paths: list[str]):
        self.queries = _RecordReader(query_paths)

    def map(self, key: int) -> tuple[int, bytes]:
        return int(key), self.queries.raw(key)


class TrainExample(grain.transforms.Map):
    """Query record (bytes, or ``(key, bytes)`` from `ReadQuery`) -> one training example.

    Module level: Grain workers are spawned and unpickle it. With a key, the example carries
    ``example_id`` (int32, the query's global key in the shards); the model ignores it, tests and
    resumption checks use it to name examples.
    """

    def __init__(self, gallery_paths: list[str], spec: ImageSpec, tokenizer: text.Tokenizer,
                 text_entity: bool = False, roi_crop: bool = False):
        self.gallery = _GalleryReader(gallery_paths)
        self.spec, self.tokenizer = spec, tokenizer
        self.text_entity, self.roi_crop = text_entity, roi_crop

    def map(self, element: bytes | tuple[int, bytes]) -> dict[str, np.ndarray]:
        key, element = element if isinstance(element, tuple) else (None, element)
        rec = records.decode_query(element)
        ref, mask, _ = reference_inputs(rec, self.spec, roi_crop=self.roi_crop)
        target = self.gallery[rec.target_gallery_index]
        if target.name != rec.target_name:
            raise ValueError(f"query {rec.reference_name!r}: target_gallery_index {rec.target_gallery_index} "
                             f"points at {target.name!r}, not {rec.target_name!r}")
        tgt, _ = image_ops.preprocess(decode_image(target.image, source=f"gallery {target.name!r} field 'image'"),
                                      None, self.spec.size, self.spec.pad_ratio)
        ids, att = self.tokenizer([query_text(rec, text_entity=self.text_entity)])
        out = {"ref_pixels": ref, "tgt_pixels": tgt, "input_ids": ids[0], "attention_mask": att[0],
               "box_mask": mask}
        if key is not None:
            out["example_id"] = np.int32(key)
        return out


# `example_id` (the query's global key) rides along for tests and debugging; the trainer drops it
# (`idmr_jax.train.trainer.NON_MODEL_KEYS`) before the batch goes to the devices.


class Augment(grain.transforms.RandomMap):
    """Optional training augmentation (the paper uses none; ``config.data.augment`` is off by default).

    Horizontal flips, independently for reference and target; the reference's patch mask flips with its image
    so the box stays on the object. Brightness/contrast jitter on the normalised pixels. Grain derives the RNG
    from the pipeline seed and the element's position, so augmented runs stay reproducible and resumable.
    """

    def __init__(self, grid: tuple[int, int], jitter: float = 0.1):
        self.grid, self.jitter = tuple(grid), jitter

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = dict(element)
        gh, gw = self.grid
        if rng.random() < 0.5:
            out["ref_pixels"] = element["ref_pixels"][:, ::-1].copy()
            mask = element["box_mask"]
            out["box_mask"] = np.concatenate([mask[:1], mask[1:].reshape(gh, gw)[:, ::-1].reshape(-1)])
        if rng.random() < 0.5:
            out["tgt_pixels"] = element["tgt_pixels"][:, ::-1].copy()
        for key in ("ref_pixels", "tgt_pixels"):
            scale, shift = 1.0 + rng.uniform(-self.jitter, self.jitter), rng.uniform(-self.jitter, self.jitter)
            out[key] = (out[key] * scale + shift).astype(np.float32)
        return out


class _Iterator:
    """Grain iterator plus the epoch length; state round-trips through checkpoints (JSON-serialisable dict).

    Iterating an mp_prefetch pipeline starts worker processes: call `close` (or use it as a context manager)
    when done, rather than leaving the clean-up to garbage collection at interpreter exit.
    """

    def __init__(self, it, steps_per_epoch: int):
        self._it, self.steps_per_epoch = it, steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags (``--grain_*``); outside ``absl.app.run`` (tests, notebooks,
    plain scripts) nothing parses them and the first read raises ``UnparsedFlagAccessError``, so mark them parsed
    with their defaults. A no-op under ``absl.app``."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def image_spec(model_config) -> ImageSpec:
    """Preprocessing geometry of an AdaFocalConfig: its input size and its encoder's patch grid."""
    from idmr_jax.models.adafocal import grid

    return ImageSpec(size=model_config.image_size, grid=tuple(grid(model_config)))


def process_share(num_records: int, index: int, count: int) -> slice:
    """Process `index`'s rows of `count`: every count-th key, the remainder dropped so that all processes hold
    the same number of rows (their epochs, and so their reshuffles, stay aligned)."""
    per_process = num_records // count
    return slice(index, per_process * count, count)


def train_iterator(config, model_config=None, *, spec: ImageSpec | None = None) -> _Iterator:
    """The training iterator over ``config.data.train_dir`` (this process's rows of each global batch).

    Keys (per-process batch b): ref_pixels/tgt_pixels float32 [b,S,S,3], input_ids/attention_mask int32
    [b,L], box_mask float32 [b,1+gh*gw], example_id int32 [b] (not a model input). The geometry comes from
    `spec`, else from the AdaFocalConfig `model_config` (`image_spec`).

    Order: this process's rows (`process_share`) shuffled with ``data.shuffle_seed`` (reseeded each epoch),
    repeated forever; with ``data.num_workers > 0`` each worker batches its own stride of that order, so the
    batch sequence depends on the worker count (deterministically) and a resumed run must keep the count.
    """
    d = config.data
    if not d.train_dir:
        raise ValueError("config.data.train_dir is empty: point it at the output of `python -m data_prep.oacirr`")
    if spec is None:
        if model_config is None:
            raise ValueError("train_iterator needs a model_config (an AdaFocalConfig) or an explicit spec")
        spec = image_spec(model_config)
    query_paths = list_shards(d.train_dir, QUERY_GLOB)
    gallery_paths = list_shards(d.train_dir, GALLERY_GLOB)
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    per_host_files = len(query_paths) // shard.shard_count
    if d.num_workers > max(per_host_files, 1):
        raise ValueError(f"{d.num_workers} data workers but only {len(query_paths)} query shards for "
                         f"{shard.shard_count} host(s) ({per_host_files} per host): lower config.data.num_workers "
                         "or convert with more --num-shards")
    if d.batch_size % shard.shard_count:
        raise ValueError(f"global batch {d.batch_size} does not divide over {shard.shard_count} processes")
    num_records = len(_RecordReader(query_paths))
    share = process_share(num_records, shard.shard_index, shard.shard_count)
    per_host = len(range(num_records)[share])
    local_batch = d.batch_size // shard.shard_count
    if per_host < local_batch:
        raise ValueError(f"{num_records} queries give {per_host} per process, fewer than the per-process batch "
                         f"{local_batch}")
    ds = grain.MapDataset.range(num_records)[share]
    ds = ds.shuffle(seed=d.shuffle_seed).repeat()  # reseeded per epoch: a new order every epoch
    ds = ds.map(ReadQuery(query_paths))
    ds = ds.map(TrainExample(gallery_paths, spec, text.Tokenizer(d.tokenizer, d.max_text_len),
                             text_entity=d.text_entity, roi_crop=d.roi_crop))
    if d.get("augment", False):
        ds = ds.random_map(Augment(spec.grid), seed=d.shuffle_seed)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(d.get("read_threads", 2), 1), prefetch_buffer_size=64))
    ds = ds.batch(local_batch, drop_remainder=True)
    if d.num_workers > 0:
        ensure_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    return _Iterator(iter(ds), steps_per_epoch=per_host // local_batch)
