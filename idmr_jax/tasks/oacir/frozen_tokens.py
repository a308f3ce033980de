"""Frozen vision-encoder tokens of one converted OACIRR folder, computed once per image: shared by the evaluation
and by training on cached tokens (`idmr_jax.tasks.oacir.feature_cache`).

A folder's images are its gallery images (in key order) and the reference images of its queries. OACIRR references
are gallery images, so a query's reference tokens are a gallery row; a reference that is not in the gallery, or the
ROI-cropped baseline's crop (a different image), gets an extra row. Tokens are the encoder's own output before
``ln_vision`` (which trains), in its compute dtype, kept in a memory-mapped file under ``$TMPDIR`` (a real split's
tokens do not fit in memory). They come from one program, `FeatureEncoder.vision`, whether the evaluation or the
training cache asks: the same encoder numbers everywhere.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from idmr_jax.data.boxes import box_to_patch_mask
from idmr_jax.data.grain_io import list_shards
from idmr_jax.tasks.oacir import eval_shards, pipeline, records


@dataclasses.dataclass
class FolderTokens:
    """A folder's records and frozen-encoder tokens.

    ``tokens[ref_rows[i]]`` are query ``i``'s reference tokens and ``box_masks[i]`` its box on the patch grid;
    ``tokens[:len(gallery)]`` are the gallery's, in key order (``tokens[query.target_gallery_index]`` is a target).
    """

    gallery: list[records.GalleryRecord]
    queries: list[records.QueryRecord]
    tokens: np.ndarray  # [len(gallery) + extra rows, N, D], memory-mapped
    ref_rows: np.ndarray  # int64 [len(queries)]
    box_masks: np.ndarray  # float32 [len(queries), 1 + gh*gw]
    scratch: tempfile.TemporaryDirectory | None = None

    @property
    def gallery_tokens(self) -> np.ndarray:
        return self.tokens[:len(self.gallery)]

    def close(self) -> None:
        """Removes the token file (the arrays must not be used afterwards)."""
        if self.scratch is not None:
            self.tokens = None
            self.scratch.cleanup()
            self.scratch = None


def reference_in_gallery(rec: records.QueryRecord, gallery: list[records.GalleryRecord]) -> bool:
    """Whether the query's reference image is the gallery image its record points at."""
    key = rec.reference_gallery_index
    return 0 <= key < len(gallery) and gallery[key].name == rec.reference_name


def encode_folder(enc, folder: str, spec: pipeline.ImageSpec, *, roi_crop: bool, box_mode: str = "exact",
                  seed: int = 0, num_workers: int = 0) -> FolderTokens:
    """Frozen tokens of every image of a converted folder, through ``enc.vision`` (a `FeatureEncoder`).

    `box_mode` (``pipeline.BOX_PERTURBATIONS`` values) and `seed` perturb the query boxes (the evaluation's
    robustness protocol); `roi_crop`: the references are cropped to their boxes and carry no box.
    """
    gallery_paths = list_shards(folder, pipeline.GALLERY_GLOB)
    gallery = eval_shards.read_gallery(gallery_paths)
    queries = eval_shards.read_queries(list_shards(folder, pipeline.QUERY_GLOB))
    n = len(gallery)
    extra = [i for i, r in enumerate(queries) if roi_crop or not reference_in_gallery(r, gallery)]
    ref_rows = np.array([r.reference_gallery_index for r in queries], np.int64)
    ref_rows[extra] = n + np.arange(len(extra))
    box_masks = np.zeros((len(queries), 1 + spec.grid[0] * spec.grid[1]), np.float32)

    scratch = tempfile.TemporaryDirectory(prefix="idmr_frozen_tokens_")
    tokens, row = None, 0

    def write(block: np.ndarray):
        nonlocal tokens, row
        if tokens is None:
            tokens = np.memmap(os.path.join(scratch.name, "tokens.bin"), dtype=block.dtype, mode="w+",
                               shape=(n + len(extra), *block.shape[1:]))
        tokens[row:row + len(block)] = block
        row += len(block)

    for pixels in eval_shards.gallery_pixel_batches(gallery_paths, spec, enc.batch_size, num_workers):
        write(enc.vision(np.asarray(pixels)))
    for start in range(0, len(extra), enc.batch_size):
        pixels = []
        for i in extra[start:start + enc.batch_size]:
            px, box_masks[i], _ = pipeline.reference_inputs(queries[i], spec, roi_crop=roi_crop, box_mode=box_mode,
                                                            seed=seed)
            pixels.append(px)
        write(enc.vision(np.stack(pixels)))
    assert row == n + len(extra), (row, n, len(extra))
    in_gallery = np.setdiff1d(np.arange(len(queries)), extra)
    for i in in_gallery:
        box = eval_shards.reference_box(queries[i], spec, box_mode, seed)
        box_masks[i] = box_to_patch_mask(box, spec.grid, (spec.size, spec.size), patch=spec.patch)
    return FolderTokens(gallery=gallery, queries=queries, tokens=tokens, ref_rows=ref_rows, box_masks=box_masks,
                        scratch=scratch)
