"""The OACIR evaluation loop: gallery features once, query features with boxes, rankings and metrics.

Outputs (the contract the checks read): ``WORKDIR/eval/metrics.json`` (flat ``"<subset>/<metric>"`` keys and
``"avg"``, in percent), ``WORKDIR/eval/rankings.jsonl`` (top 50 gallery names per query) and, where images
are available, one PNG result grid per subset. ``WORKDIR`` may be local or ``gs://`` (files go through
``etils.epath``); only process 0 writes.

Multi-process: every process runs the same loop over the same (global) data; each block is placed on the
whole mesh and the features come back replicated, so every process ends with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from idmr_jax import sharding as shd
from idmr_jax.tasks.oacir import metrics as metrics_lib
from idmr_jax.evaluation.retrieval import topk_retrieval


class FeatureEncoder:
    """Jitted encoders over fixed-size, batch-sharded blocks; padding rows never reach the results.

    The frozen vision tower is a separate program (`vision`), so its tokens can be cached and reused: the
    reference images of OACIRR queries are gallery images, whose tokens the gallery pass already computed.
    """

    def __init__(self, model, batch_size: int, mesh=None, rules=shd.DEFAULT_RULES):
        self.graphdef, self.state = nnx.split(model)
        n = mesh.size if mesh is not None else 1
        self.batch_size = max(n, -(-batch_size // n) * n)
        spec = shd.logical_to_pspec(("batch",), rules)
        self._sharding = (lambda nd: NamedSharding(mesh, PartitionSpec(*spec, *([None] * (nd - 1))))) \
            if mesh is not None else (lambda nd: None)
        # Replicated outputs: every process can read them (a batch-sharded result would be split across hosts).
        out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None

        def vision(state, pixels):
            return nnx.merge(self.graphdef, state).encode_image(pixels)

        def targets(state, embeds):
            return nnx.merge(self.graphdef, state).target_features(embeds)

        def queries(state, embeds, ids, mask, box_mask):
            return nnx.merge(self.graphdef, state).query_features(embeds, ids, mask, box_mask)

        self._vision, self._targets, self._queries = (jax.jit(f, out_shardings=out) for f in (vision, targets, queries))

    def pad(self, arrays: dict[str, np.ndarray]) -> tuple[int, dict]:
        """Pads a block (<= batch_size rows) to batch_size and places it on the mesh."""
        valid = len(next(iter(arrays.values())))
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            if valid < self.batch_size:
                v = np.concatenate([v, np.repeat(v[-1:], self.batch_size - valid, axis=0)])
            sh = self._sharding(v.ndim)
            # Every process holds the whole block: each hands over the rows of its own devices.
            out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx]) if sh is not None else v
        return valid, out

    def _blocks(self, arrays: dict[str, np.ndarray]) -> Iterator[tuple[int, dict]]:
        n = len(next(iter(arrays.values())))
        for start in range(0, n, self.batch_size):
            yield self.pad({k: v[start:start + self.batch_size] for k, v in arrays.items()})

    def vision_and_targets(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vision tokens [N, Nimg, Dv], target features [N, Q, E]) for a block of <= batch_size images."""
        valid, b = self.pad({"pixels": pixels})
        embeds = self._vision(self.state, b["pixels"])
        feats = self._targets(self.state, embeds)
        return np.asarray(embeds)[:valid], np.asarray(feats)[:valid]

    def targets(self, pixels: np.ndarray) -> np.ndarray:
        """[N, Q, E] float32 target features for [N, H, W, 3] pixels."""
        return np.concatenate([self.vision_and_targets(pixels[i:i + self.batch_size])[1]
                               for i in range(0, len(pixels), self.batch_size)])

    def queries_from_embeds(self, embeds, input_ids, attention_mask, box_mask) -> tuple[np.ndarray, np.ndarray]:
        """([N, E] query features, [N, 1|Q] beta) from reference vision tokens (<= batch_size rows)."""
        valid, b = self.pad(dict(embeds=embeds, ids=input_ids, mask=attention_mask, box=box_mask))
        q, beta = self._queries(self.state, b["embeds"], b["ids"], b["mask"], b["box"])
        return np.asarray(q)[:valid], np.asarray(beta)[:valid]

    def queries(self, pixels, input_ids, attention_mask, box_mask) -> tuple[np.ndarray, np.ndarray]:
        """([N, E] query features, [N, 1|Q] beta) from reference pixels."""
        qs, betas = [], []
        for start in range(0, len(pixels), self.batch_size):
            sl = slice(start, start + self.batch_size)
            valid, b = self.pad({"pixels": pixels[sl]})
            embeds = np.asarray(self._vision(self.state, b["pixels"]))[:valid]
            q, beta = self.queries_from_embeds(embeds, input_ids[sl], attention_mask[sl], box_mask[sl])
            qs.append(q)
            betas.append(beta)
        return np.concatenate(qs), np.concatenate(betas)


def rank_gallery(query: np.ndarray, gallery: np.ndarray, top: int) -> np.ndarray:
    """Indices [Nq, min(top, Ng)] of the best gallery items by AdaFocal's max-over-tokens score.

    Chunked over the gallery and over queries, so the score block stays bounded for real gallery sizes.
    """
    k = min(top, gallery.shape[0])
    _, idx = topk_retrieval(jnp.asarray(query), jnp.asarray(gallery), k, chunk_size=min(2048, gallery.shape[0]),
                            query_chunk=min(512, query.shape[0]))
    return np.asarray(idx)


def evaluate_subset(subset: str, query_feats: np.ndarray, gallery_feats: np.ndarray, *,
                    gallery_names, gallery_instances, reference_names, target_names, query_ids,
                    query_instances=None) -> tuple[dict, list[dict], np.ndarray]:
    """Metrics, ranking records and the raw rankings for one subset."""
    rankings = rank_gallery(query_feats, gallery_feats, top=51)  # 51: R@50 after removing the reference
    m = metrics_lib.compute_recalls(rankings, gallery_names=gallery_names, gallery_instances=gallery_instances,
                                    reference_names=reference_names, target_names=target_names,
                                    query_instances=query_instances, query_ids=query_ids)
    records = metrics_lib.ranking_records(rankings, query_ids=query_ids, subset=subset,
                                          gallery_names=gallery_names, reference_names=reference_names)
    return m, records, rankings


def write_outputs(workdir, per_subset: dict, records: Iterable[dict]) -> dict:
    """Writes ``WORKDIR/eval/metrics.json`` (flat, in percent) and ``rankings.jsonl`` from process 0; returns
    the flat metrics (on every process)."""
    flat = metrics_lib.aggregate(per_subset)
    if jax.process_index() == 0:
        metrics_lib.write_metrics(workdir, flat)
        metrics_lib.write_rankings(workdir, records)
    return flat


def evaluate_fake(model, spec, config: ml_collections.ConfigDict, workdir) -> dict:
    """The protocol on the synthetic pool: gallery = every target, queries = every example."""
    from idmr_jax.tasks.oacir import fake

    pool = fake.make_pool(spec)
    mesh = shd.make_mesh(dict(config.sharding.mesh))
    enc = FeatureEncoder(model, config.eval.batch_size, mesh, tuple(tuple(r) for r in config.sharding.rules))
    gallery = enc.targets(pool["tgt_pixels"])
    q, _ = enc.queries(pool["ref_pixels"], pool["input_ids"], pool["attention_mask"], pool["box_mask"])
    n = len(q)
    names = [f"target_{i:05d}" for i in range(n)]
    m, records, _ = evaluate_subset(
        "fake", q, gallery, gallery_names=names, gallery_instances=pool["instance"].tolist(),
        reference_names=[f"reference_{i:05d}" for i in range(n)], target_names=names,
        query_ids=[f"query_{i:05d}" for i in range(n)], query_instances=pool["instance"].tolist())
    return write_outputs(workdir, {"fake": m}, records)


def evaluate_arrayrecord(model, config, model_config, workdir) -> dict:
    """The protocol on converted OACIRR val shards; ``config.data.val_dir`` lists folders, comma-separated."""
    from idmr_jax.tasks.oacir import eval_shards as oacir_shards

    return oacir_shards.evaluate(model, config, model_config, workdir)
