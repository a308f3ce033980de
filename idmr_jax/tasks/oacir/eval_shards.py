"""OACIR evaluation on converted val shards: one gallery pass (tokens cached), queries from the cache."""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict

import grain
import jax
import numpy as np
from absl import logging
from etils import epath

from idmr_jax import sharding as shd
from idmr_jax.data import image_ops, records, text
from idmr_jax.tasks.oacir import pipeline as oacir_pipeline
from idmr_jax.data.boxes import box_to_patch_mask, perturb_box
from idmr_jax.tasks.oacir import evaluate as oacir_eval
from idmr_jax.tasks.oacir import visualize


class GalleryPixels(grain.transforms.Map):
    """Gallery record bytes -> preprocessed pixels (module level: Grain workers are spawned)."""

    def __init__(self, spec: oacir_pipeline.ImageSpec):
        self.spec = spec

    def map(self, element: bytes) -> np.ndarray:
        rec = records.decode_gallery(element)
        image = oacir_pipeline.decode_image(rec.image, source=f"gallery {rec.name!r} field 'image'")
        return image_ops.preprocess(image, None, self.spec.size, self.spec.pad_ratio)[0]


def _gallery_metadata(paths: list[str]) -> list[records.GalleryRecord]:
    src = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode_gallery(src[i]) for i in range(len(src))]


def _query_records(paths: list[str]) -> list[records.QueryRecord]:
    src = grain.sources.ArrayRecordDataSource(paths)
    return [records.decode_query(src[i]) for i in range(len(src))]


def _final_box(rec: records.QueryRecord, spec, mode: str, seed: int):
    """The reference box in the preprocessed frame, after the robustness perturbation (if any)."""
    box = rec.reference_box
    w, h = rec.reference_size
    if box is not None and mode != "exact":
        box = perturb_box(box, mode, (h, w), seed=(seed, rec.source_index))
    return image_ops.transform_box(box, (w, h), spec.size, spec.pad_ratio)


def evaluate_folder(enc: oacir_eval.FeatureEncoder, folder: str, config, spec, workdir) -> dict[str, tuple]:
    """Metrics and ranking records per subset found in one converted val folder."""
    d, e = config.data, config.eval
    gallery_paths = oacir_pipeline.list_shards(folder, oacir_pipeline.GALLERY_GLOB)
    query_paths = oacir_pipeline.list_shards(folder, oacir_pipeline.QUERY_GLOB)
    gallery = _gallery_metadata(gallery_paths)
    queries = _query_records(query_paths)
    n = len(gallery)

    # Gallery pass: vision tokens go to a memory-mapped cache on local scratch disk (reused by the queries; the
    # workdir may be an object store), target features stay in memory.
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(gallery_paths)).map(GalleryPixels(spec))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)).batch(enc.batch_size)
    if d.num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
    cache_dir = tempfile.TemporaryDirectory(prefix="idmr_eval_tokens_")  # $TMPDIR; removed when done
    tokens_cache = None
    feats = None
    row = 0
    for pixels in ds:
        embeds, tf = enc.vision_and_targets(np.asarray(pixels))
        if tokens_cache is None:
            tokens_cache = np.lib.format.open_memmap(os.path.join(cache_dir.name, "vision.npy"), mode="w+",
                                                     dtype=np.float32, shape=(n, *embeds.shape[1:]))
            feats = np.zeros((n, *tf.shape[1:]), np.float32)
        tokens_cache[row:row + len(embeds)] = embeds
        feats[row:row + len(tf)] = tf
        row += len(tf)
    assert row == n, (row, n)

    tokenizer = text.Tokenizer(d.tokenizer, d.max_text_len)
    mode = oacir_pipeline.BOX_PERTURBATIONS[e.box_perturbation]
    by_subset = defaultdict(list)
    for i, q in enumerate(queries):
        by_subset[q.subset].append(i)
    gallery_subset = np.array([g.subset for g in gallery])
    results = {}
    for subset, idx in sorted(by_subset.items()):
        qrecs = [queries[i] for i in idx]
        q_feats, betas = [], []
        for start in range(0, len(qrecs), enc.batch_size):
            block = qrecs[start:start + enc.batch_size]
            ids, att = tokenizer([oacir_pipeline.query_text(r, text_entity=d.text_entity) for r in block])
            masks, embeds = [], []
            for r in block:
                cached = 0 <= r.reference_gallery_index < n and gallery[r.reference_gallery_index].name == r.reference_name
                if cached and not d.roi_crop:
                    embeds.append(tokens_cache[r.reference_gallery_index])
                    masks.append(box_to_patch_mask(_final_box(r, spec, mode, config.seed), spec.grid, (spec.size, spec.size)))
                else:  # not in the gallery, or the ROI baseline (which sees a different image): encode it
                    pixels, mask, _ = oacir_pipeline.reference_inputs(r, spec, roi_crop=d.roi_crop, box_mode=mode,
                                                                      seed=config.seed)
                    valid, b = enc.pad({"pixels": pixels[None]})
                    embeds.append(np.asarray(enc._vision(enc.state, b["pixels"]))[0])
                    masks.append(mask)
            qf, beta = enc.queries_from_embeds(np.stack(embeds), ids, att, np.stack(masks))
            q_feats.append(qf)
            betas.append(beta)
        q_feats = np.concatenate(q_feats)
        # The released protocol ranks the subset's own gallery (a Union folder holds several subsets).
        in_subset = np.flatnonzero(gallery_subset == subset) if (gallery_subset == subset).any() else np.arange(n)
        names = [gallery[j].name for j in in_subset]
        m, recs, rankings = oacir_eval.evaluate_subset(
            subset, q_feats, feats[in_subset], gallery_names=names,
            gallery_instances=[gallery[j].instance for j in in_subset],
            reference_names=[r.reference_name for r in qrecs], target_names=[r.target_name for r in qrecs],
            query_ids=[f"{subset}/{r.source_index}" for r in qrecs])
        m["beta_mean"] = float(np.concatenate(betas).mean())
        results[subset] = (m, recs)
        if jax.process_index() == 0 and e.grid_queries:
            visualize.write_grid(epath.Path(workdir) / "eval" / f"{subset}_results.png", qrecs[:e.grid_queries],
                                 [[in_subset[j] for j in row[:6]] for row in rankings[:e.grid_queries]], gallery,
                                 spec)
    del tokens_cache
    cache_dir.cleanup()
    return results


def evaluate(model, config, model_config, workdir) -> dict:
    """Every val folder in ``config.data.val_dir`` (comma-separated); writes the eval outputs."""
    folders = [f for f in (config.data.val_dir or "").split(",") if f]
    if not folders:
        raise ValueError("config.data.val_dir is empty: point it at converted val folders (comma-separated)")
    mesh = shd.make_mesh(dict(config.sharding.mesh))
    enc = oacir_eval.FeatureEncoder(model, config.eval.batch_size, mesh, tuple(tuple(r) for r in config.sharding.rules))
    spec = oacir_pipeline.image_spec(model_config)
    per_subset, all_records = {}, []
    for folder in folders:
        for subset, (m, recs) in evaluate_folder(enc, folder, config, spec, workdir).items():
            if subset in per_subset:
                raise ValueError(f"subset {subset!r} appears in more than one val folder")
            per_subset[subset] = {k: v for k, v in m.items() if k != "beta_mean"}
            all_records.extend(recs)
            logging.info("eval %s: %s (beta mean %.3f)", subset, per_subset[subset], m["beta_mean"])
    return oacir_eval.write_outputs(workdir, per_subset, all_records)
