"""Reading converted OACIRR val shards for evaluation: gallery and query records, the gallery's pixels as a Grain
pipeline, and query boxes in the model's frame. The evaluation loop (`idmr_jax.tasks.oacir.evaluate`) builds on
this module; nothing here imports it."""

from __future__ import annotations

from collections import defaultdict

import grain
import numpy as np

from idmr_jax.data import image_ops
from idmr_jax.data.boxes import perturb_box
from idmr_jax.data.grain_io import decode_image, ensure_flags_parsed
from idmr_jax.tasks.oacir import records
from idmr_jax.tasks.oacir.pipeline import ImageSpec


class GalleryPixels(grain.transforms.Map):
    """Gallery record bytes -> preprocessed pixels (module level: Grain workers are spawned)."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec

    def map(self, element: bytes) -> np.ndarray:
        rec = records.decode_gallery(element)
        image = decode_image(rec.image, source=f"gallery {rec.name!r} field 'image'")
        return image_ops.preprocess(image, None, self.spec.size, self.spec.pad_ratio)[0]


def read_gallery(paths: list[str]) -> list[records.GalleryRecord]:
    """Every gallery record of the shards `paths`, in global key order (the keys query records refer to)."""
    src = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode_gallery(src[i]) for i in range(len(src))]


def read_queries(paths: list[str]) -> list[records.QueryRecord]:
    """Every query record of the shards `paths`, in global key order."""
    src = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode_query(src[i]) for i in range(len(src))]


def gallery_pixel_batches(paths: list[str], spec: ImageSpec, batch_size: int, num_workers: int = 0):
    """The gallery's preprocessed pixels in key order, in batches of `batch_size` (the last one may be short)."""
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(GalleryPixels(spec))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)).batch(batch_size)
    if num_workers > 0:
        ensure_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def queries_by_subset(queries: list[records.QueryRecord]) -> dict[str, list[int]]:
    """Query positions per subset, subsets in sorted order."""
    by_subset = defaultdict(list)
    for i, q in enumerate(queries):
        by_subset[q.subset].append(i)
    return dict(sorted(by_subset.items()))


def reference_box(rec: records.QueryRecord, spec: ImageSpec, mode: str, seed: int):
    """The reference box in the preprocessed frame, after the robustness perturbation `mode` (if any)."""
    box = rec.reference_box
    w, h = rec.reference_size
    if box is not None and mode != "exact":
        box = perturb_box(box, mode, (h, w), seed=(seed, rec.source_index))
    return image_ops.transform_box(box, (w, h), spec.size, spec.pad_ratio)
