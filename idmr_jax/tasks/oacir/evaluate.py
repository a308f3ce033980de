"""The OACIR evaluation: gallery features once, query features with boxes, rankings and metrics.

Outputs (the contract the checks read): ``WORKDIR/eval/metrics.json`` (flat ``"<subset>/<metric>"`` keys and
``"avg"``, in percent), ``WORKDIR/eval/rankings.jsonl`` (top 50 gallery names per query, with its reference and
target names) and, where images
are available, one PNG result grid per subset. ``WORKDIR`` may be local or ``gs://`` (files go through
``etils.epath``); only process 0 writes.

With CAAM or a fixed beta (``config.model.beta_mode`` "adaptive" | "fixed"; not for the "none" baseline, which has
no beta) it also writes ``WORKDIR/eval/betas.jsonl``: one ``{"query_id", "subset", "beta", "reference", "target",
"box_area_fraction"}`` per query, ``query_id`` and ``subset`` as in ``rankings.jsonl``. ``beta`` is a float (scalar
CAAM) or a list (one per query token, ``vector``); ``box_area_fraction`` is the annotated reference box's share of
the reference image (before any ``box_perturbation``), null without a box. The CAAM analyses (`idmr_jax.analysis`)
read it.

Multi-process: every process runs the same loop over the same (global) data; each block is placed on the
whole mesh and the features come back replicated (`idmr_jax.evaluation.blocks`), so every process ends with the
same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from idmr_jax import sharding as shd
from idmr_jax.data import text
from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.blocks import BlockEncoder
from idmr_jax.evaluation.ranking import rank_gallery
from idmr_jax.tasks.oacir import eval_shards, frozen_tokens, metrics, pipeline, visualize


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jax.numpy.float32), tree)


class FeatureEncoder(BlockEncoder):
    """AdaFocal's encoders over padded, batch-sharded blocks (see `BlockEncoder`).

    The frozen vision encoder is a program of its own (`vision`: its tokens before ``ln_vision``), so its tokens
    are computed once per image and reused (`idmr_jax.tasks.oacir.frozen_tokens`): the reference images of
    OACIRR queries are gallery images, and training on cached tokens reads the same program's numbers.
    """

    def __init__(self, model, batch_size: int, mesh=None, rules=shd.DEFAULT_RULES):
        super().__init__(model, batch_size, mesh, rules)
        self._vision = self.program(lambda m, pixels: m.vision_tokens(pixels))
        # Features leave as float32 whatever config.precision computed them in (numpy has no bf16 matmul).
        self._targets = self.program(lambda m, tokens: _float32(m.target_features(m.embed_tokens(tokens))))
        self._queries = self.program(
            lambda m, tokens, ids, mask, box: _float32(m.query_features(m.embed_tokens(tokens), ids, mask, box)))

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        """Frozen-encoder tokens [N, Nimg, Dv] (before ``ln_vision``) of a block of <= batch_size images."""
        return self.run(self._vision, {"pixels": pixels})

    def targets_from_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """[N, Q, E] float32 target features from frozen-encoder tokens (any number of rows)."""
        return self.run_arrays(self._targets, {"tokens": tokens})

    def vision_and_targets(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(frozen-encoder tokens [N, Nimg, Dv], target features [N, Q, E]) for <= batch_size images."""
        valid, b = self.pad({"pixels": pixels})
        tokens = self._vision(self.state, **b)
        feats = self._targets(self.state, tokens=tokens)
        return np.asarray(tokens)[:valid], np.asarray(feats)[:valid]

    def targets(self, pixels: np.ndarray) -> np.ndarray:
        """[N, Q, E] float32 target features for [N, H, W, 3] pixels."""
        return np.concatenate([self.vision_and_targets(pixels[rows.start:rows.stop])[1]
                               for rows in self.row_blocks(len(pixels))])

    def queries_from_tokens(self, tokens, input_ids, attention_mask, box_mask) -> tuple[np.ndarray, np.ndarray]:
        """([N, E] query features, [N, 1|Q] beta) from reference frozen-encoder tokens (<= batch_size rows)."""
        return self.run(self._queries, dict(tokens=tokens, ids=input_ids, mask=attention_mask, box=box_mask))

    def queries(self, pixels, input_ids, attention_mask, box_mask) -> tuple[np.ndarray, np.ndarray]:
        """([N, E] query features, [N, 1|Q] beta) from reference pixels."""
        qs, betas = [], []
        for rows in self.row_blocks(len(pixels)):
            sl = slice(rows.start, rows.stop)
            q, beta = self.queries_from_tokens(self.vision(pixels[sl]), input_ids[sl], attention_mask[sl],
                                               box_mask[sl])
            qs.append(q)
            betas.append(beta)
        return np.concatenate(qs), np.concatenate(betas)


def evaluate_subset(subset: str, query_feats: np.ndarray, gallery_feats: np.ndarray, *,
                    gallery_names, gallery_instances, reference_names, target_names, query_ids,
                    query_instances=None) -> tuple[dict, list[dict], np.ndarray]:
    """Metrics, ranking records and the raw rankings for one subset."""
    rankings = rank_gallery(query_feats, gallery_feats, top=51)  # 51: R@50 after removing the reference
    m = metrics.compute_recalls(rankings, gallery_names=gallery_names, gallery_instances=gallery_instances,
                                reference_names=reference_names, target_names=target_names,
                                query_instances=query_instances, query_ids=query_ids)
    records = metrics.ranking_records(rankings, query_ids=query_ids, subset=subset,
                                      gallery_names=gallery_names, reference_names=reference_names,
                                      target_names=target_names)
    return m, records, rankings


def write_outputs(workdir, per_subset: dict, records: Iterable[dict]) -> dict:
    """Writes ``WORKDIR/eval/metrics.json`` (flat, in percent) and ``rankings.jsonl`` from process 0; returns
    the flat metrics (on every process)."""
    flat = metrics.aggregate(per_subset)
    outputs.write_results(workdir, flat, records)
    return flat


def beta_records(subset: str, query_ids: Sequence[str], betas: np.ndarray, *, references: Sequence[str],
                 targets: Sequence[str], box_fractions: Sequence[float | None]) -> list[dict]:
    """The ``betas.jsonl`` records of one subset: `betas` [N, 1] (scalar CAAM) or [N, Q] (one per query token)."""
    betas = np.asarray(betas, np.float64).reshape(len(query_ids), -1)
    return [{"query_id": str(q), "subset": subset, "beta": float(b[0]) if b.size == 1 else b.tolist(),
             "reference": str(r), "target": str(t), "box_area_fraction": None if f is None else float(f)}
            for q, b, r, t, f in zip(query_ids, betas, references, targets, box_fractions)]


def write_betas(workdir, records: Iterable[dict], config) -> None:
    """``WORKDIR/eval/betas.jsonl`` from process 0, unless the model has no beta (``beta_mode == "none"``)."""
    if config.model.beta_mode == "none" or jax.process_index() != 0:
        return
    (outputs.eval_dir(workdir) / "betas.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _box_fraction(query) -> float | None:
    """The reference box's share of the stored reference image, or None without a box."""
    if query.reference_box is None:
        return None
    x1, y1, x2, y2 = query.reference_box
    w, h = query.reference_size
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0) / float(w * h)


def evaluate_fake(model, spec, config: ml_collections.ConfigDict, workdir) -> dict:
    """The protocol on the synthetic pool: gallery = every target, queries = every example."""
    from idmr_jax.tasks.oacir import fake

    pool = fake.make_pool(spec)
    enc = FeatureEncoder.from_config(model, config)
    gallery = enc.targets(pool["tgt_pixels"])
    q, betas = enc.queries(pool["ref_pixels"], pool["input_ids"], pool["attention_mask"], pool["box_mask"])
    n = len(q)
    names = [f"target_{i:05d}" for i in range(n)]
    refs, query_ids = [f"reference_{i:05d}" for i in range(n)], [f"query_{i:05d}" for i in range(n)]
    m, records, _ = evaluate_subset(
        "fake", q, gallery, gallery_names=names, gallery_instances=pool["instance"].tolist(),
        reference_names=refs, target_names=names, query_ids=query_ids, query_instances=pool["instance"].tolist())
    h, w = pool["ref_pixels"].shape[1:3]
    fractions = [float((b[2] - b[0]) * (b[3] - b[1]) / (h * w)) if mask.any() else None  # no mask: no box
                 for b, mask in zip(pool["boxes"], pool["box_mask"])]
    write_betas(workdir, beta_records("fake", query_ids, betas, references=refs, targets=names,
                                      box_fractions=fractions), config)
    return write_outputs(workdir, {"fake": m}, records)


def folder_tokens(enc: FeatureEncoder, folder: str, config, spec) -> frozen_tokens.FolderTokens:
    """A val folder's frozen-encoder tokens with the evaluation's boxes (``config.eval.box_perturbation``)."""
    d = config.data
    return frozen_tokens.encode_folder(enc, folder, spec, roi_crop=d.roi_crop,
                                       box_mode=pipeline.BOX_PERTURBATIONS[config.eval.box_perturbation],
                                       seed=config.seed, num_workers=d.num_workers)


def evaluate_folder(enc: FeatureEncoder, folder: str, config, spec, workdir,
                    tokens: frozen_tokens.FolderTokens | None = None) -> dict[str, tuple]:
    """(metrics, ranking records, `beta_records`) per subset found in one converted val folder.

    `tokens`: the folder's frozen-encoder tokens if already computed (training on cached tokens computes them
    before the first step, from the same program); else they are computed here and removed when done.
    """
    d, e = config.data, config.eval
    owned = tokens is None
    if owned:
        tokens = folder_tokens(enc, folder, config, spec)
    gallery, queries = tokens.gallery, tokens.queries
    n = len(gallery)
    feats = enc.targets_from_tokens(tokens.gallery_tokens)
    tokenizer = text.Tokenizer(d.tokenizer, d.max_text_len)
    gallery_subset = np.array([g.subset for g in gallery])
    results = {}
    for subset, idx in eval_shards.queries_by_subset(queries).items():
        qrecs = [queries[i] for i in idx]
        q_feats, betas = [], []
        for start in range(0, len(idx), enc.batch_size):
            block = idx[start:start + enc.batch_size]
            ids, att = tokenizer([pipeline.query_text(queries[i], text_entity=d.text_entity) for i in block])
            qf, beta = enc.queries_from_tokens(tokens.tokens[tokens.ref_rows[block]], ids, att,
                                               tokens.box_masks[block])
            q_feats.append(qf)
            betas.append(beta)
        q_feats = np.concatenate(q_feats)
        query_ids = [f"{subset}/{r.source_index}" for r in qrecs]
        # The released protocol ranks the subset's own gallery (a Union folder holds several subsets).
        in_subset = np.flatnonzero(gallery_subset == subset) if (gallery_subset == subset).any() else np.arange(n)
        names = [gallery[j].name for j in in_subset]
        m, recs, rankings = evaluate_subset(
            subset, q_feats, feats[in_subset], gallery_names=names,
            gallery_instances=[gallery[j].instance for j in in_subset],
            reference_names=[r.reference_name for r in qrecs], target_names=[r.target_name for r in qrecs],
            query_ids=query_ids)
        m["beta_mean"] = float(np.concatenate(betas).mean())
        results[subset] = (m, recs, beta_records(
            subset, query_ids, np.concatenate(betas), references=[r.reference_name for r in qrecs],
            targets=[r.target_name for r in qrecs], box_fractions=[_box_fraction(r) for r in qrecs]))
        if jax.process_index() == 0 and e.grid_queries:
            visualize.write_grid(outputs.eval_dir(workdir) / f"{subset}_results.png", qrecs[:e.grid_queries],
                                 [[in_subset[j] for j in row[:6]] for row in rankings[:e.grid_queries]], gallery,
                                 spec)
    if owned:
        tokens.close()
    return results


def evaluate_arrayrecord(model, config, model_config, workdir,
                         tokens: dict[str, frozen_tokens.FolderTokens] | None = None) -> dict:
    """The protocol on converted OACIRR val shards: every folder in ``config.data.val_dir`` (comma-separated);
    writes the eval outputs. `tokens`: frozen-encoder tokens already computed, by folder (see `evaluate_folder`)."""
    folders = [f for f in (config.data.val_dir or "").split(",") if f]
    if not folders:
        raise ValueError("config.data.val_dir is empty: point it at converted val folders (comma-separated)")
    enc = FeatureEncoder.from_config(model, config)
    spec = pipeline.image_spec(model_config)
    per_subset, all_records, all_betas = {}, [], []
    for folder in folders:
        for subset, (m, recs, betas) in evaluate_folder(enc, folder, config, spec, workdir,
                                                         (tokens or {}).get(folder)).items():
            if subset in per_subset:
                raise ValueError(f"subset {subset!r} appears in more than one val folder")
            per_subset[subset] = {k: v for k, v in m.items() if k != "beta_mean"}
            all_records.extend(recs)
            all_betas.extend(betas)
            logging.info("eval %s: %s (beta mean %.3f)", subset, per_subset[subset], m["beta_mean"])
    write_betas(workdir, all_betas, config)
    return write_outputs(workdir, per_subset, all_records)
