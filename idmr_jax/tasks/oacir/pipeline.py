"""Grain pipelines over converted OACIRR shards (see `data_prep.oacirr` and `idmr_jax.tasks.oacir.records`).

Training:
    ArrayRecord query shards -> this process's share (`grain_io.plan_process`) -> seeded shuffle, reseeded every
    epoch -> repeat -> decode + TargetPad(1.25)/resize/crop/CLIP-normalise (reference and target, the target
    read from the gallery shards by key) -> box through the same affine map -> patch mask -> BERT tokens
    (max 32) -> batches of this process's rows -> optional worker processes.
The iterator's state (``get_state``/``set_state``) is saved with every checkpoint, so a resumed run sees
exactly the examples an uninterrupted run would have seen.

Evaluation reads the val shards in order (no shuffle) through the same per-example transforms.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from idmr_jax.data import image_ops, text
from idmr_jax.data.boxes import box_to_patch_mask, perturb_box
from idmr_jax.data.grain_io import (CheckpointableIterator, ProcessPlan, RecordReader, batched_iterator,
                                    check_worker_count, decode_image, list_shards, plan_process)
from idmr_jax.tasks.oacir import records

QUERY_GLOB = "queries-*.array_record"
GALLERY_GLOB = "gallery-*.array_record"
BOX_PERTURBATIONS = {"none": "exact", "iou0.8": "scale", "iou0.5": "scale_shift", "no_box": "none"}


@dataclasses.dataclass
class ImageSpec:
    """Preprocessing geometry: square input `size`, TargetPad `pad_ratio`, the encoder's patch `grid` and the
    `patch` its box masks use (the ViT's patch size; None: the grid is not a patch grid, see data.boxes)."""

    size: int
    grid: tuple[int, int]
    pad_ratio: float = 1.25
    patch: int | None = None


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
    mask = box_to_patch_mask(final_box, spec.grid, (spec.size, spec.size), patch=spec.patch)
    return pixels, mask, final_box


def query_text(rec: records.QueryRecord, *, text_entity: bool) -> str:
    """The Q-Former text of a query: BLIP's caption cleaning, with the entity prompt when `text_entity`."""
    t = text.blip_caption(rec.modification_text)
    return text.with_entity_prompt(t, rec.object_category, rec.source_index) if text_entity else t


class GalleryReader(RecordReader):
    """Gallery records by global key (the keys stored in query records)."""

    def __getitem__(self, key: int) -> records.GalleryRecord:
        return records.decode_gallery(self.raw(key))


class ReadQuery(grain.transforms.Map):
    """Global query key -> ``(key, record bytes)``: the key travels with the example as ``example_id``."""

    def __init__(self, query_paths: list[str]):
        self.queries = RecordReader(query_paths)

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
        self.gallery = GalleryReader(gallery_paths)
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


def image_spec(model_config) -> ImageSpec:
    """Preprocessing geometry of an AdaFocalConfig: its input size and its encoder's patch grid."""
    from idmr_jax.models.adafocal import grid
    from idmr_jax.models.vision import mask_patch_size

    return ImageSpec(size=model_config.image_size, grid=tuple(grid(model_config)),
                     patch=mask_patch_size(model_config.blip2.vision))


def check_train_dir(config) -> None:
    """A ValueError that says how to fill ``config.data.train_dir`` when it is empty."""
    if not config.data.train_dir:
        raise ValueError("config.data.train_dir is empty: point it at the output of `python -m data_prep.oacirr` "
                         "(for source='demo', call idmr_jax.tasks.prepare_data(config) first, as main does)")


def training_order(config, num_records: int) -> tuple[grain.MapDataset, ProcessPlan]:
    """(this process's query keys in training order, forever; its `ProcessPlan`): its share of the keys shuffled
    with ``data.shuffle_seed``, reshuffled every epoch (the shuffle sees the epoch in the index). Element ``i`` is
    the ``i``-th example this process trains on (with no worker processes)."""
    plan = plan_process(num_records, config.data.batch_size, what="queries")
    ds = grain.MapDataset.range(num_records)[plan.keys]
    return ds.shuffle(seed=config.data.shuffle_seed).repeat(), plan


def train_iterator(config, model_config=None, *, spec: ImageSpec | None = None) -> CheckpointableIterator:
    """The training iterator over ``config.data.train_dir`` (this process's rows of each global batch).

    Keys (per-process batch b): ref_pixels/tgt_pixels float32 [b,S,S,3], input_ids/attention_mask int32
    [b,L], box_mask float32 [b,1+gh*gw], example_id int32 [b] (not a model input). The geometry comes from
    `spec`, else from the AdaFocalConfig `model_config` (`image_spec`).

    Order: this process's rows (`grain_io.process_share`) shuffled with ``data.shuffle_seed`` (reseeded each epoch),
    repeated forever; with ``data.num_workers > 0`` each worker batches its own stride of that order, so the
    batch sequence depends on the worker count (deterministically) and a resumed run must keep the count.
    """
    d = config.data
    check_train_dir(config)
    if spec is None:
        if model_config is None:
            raise ValueError("train_iterator needs a model_config (an AdaFocalConfig) or an explicit spec")
        spec = image_spec(model_config)
    query_paths = list_shards(d.train_dir, QUERY_GLOB)
    gallery_paths = list_shards(d.train_dir, GALLERY_GLOB)
    check_worker_count(d.num_workers, len(query_paths), shards="query shards",
                       remedy="convert with more --num-shards")
    ds, plan = training_order(config, len(RecordReader(query_paths)))
    ds = ds.map(ReadQuery(query_paths))
    ds = ds.map(TrainExample(gallery_paths, spec, text.Tokenizer(d.tokenizer, d.max_text_len),
                             text_entity=d.text_entity, roi_crop=d.roi_crop))
    if d.get("augment", False):
        ds = ds.random_map(Augment(spec.grid), seed=d.shuffle_seed)
    return batched_iterator(ds, plan, num_workers=d.num_workers, read_threads=d.get("read_threads", 2))
