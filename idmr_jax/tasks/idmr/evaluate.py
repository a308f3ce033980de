"""IDMR instance retrieval evaluation: embed queries and gallery, rank, R@K and R_ID@K, write the results.

Protocol (IDMR-bench style): a query is the crop of an instance taken from one image plus the location caption of
*another* image showing the same instance; the gallery holds every full image of the split (the crop's own image
included, as a distractor that matches the object but not the scene). R@K: the target image is among the top K;
R_ID@K: some image showing the query's instance is (the object found, whatever the scene). Percentages.

Outputs: ``WORKDIR/eval/metrics.json`` (flat ``{"R@1": ..., "R_ID@1": ..., "avg": mean of R@1 and R@5}``) and
``WORKDIR/eval/rankings.jsonl`` (top 10 gallery names per query), written through etils.epath (gs:// works).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from idmr_jax.tasks.oacir import metrics as metrics_lib
from idmr_jax.evaluation.retrieval import topk_retrieval

KS = (1, 5, 10)
ID_KS = (1, 5)


class Embedder:
    """Jitted ``model.embed`` over fixed-size blocks (one compiled program; the last block is padded)."""

    def __init__(self, model, batch_size: int):
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size

        def embed(state, pixels, ids, mask):
            return nnx.merge(self.graphdef, state).embed(ids, mask, pixels).astype(jnp.float32)

        self._embed = jax.jit(embed)

    def __call__(self, blocks) -> np.ndarray:
        """`blocks` yields dicts of pixels / ids / mask with <= batch_size rows; returns [N, D] float32."""
        out = []
        for b in blocks:
            n = len(b["ids"])

            def pad(a, n=n):
                return np.concatenate([a, np.repeat(a[-1:], self.batch_size - n, axis=0)]) if n < self.batch_size else a

            out.append(np.asarray(self._embed(self.state, pad(b["pixels"]), pad(b["ids"]), pad(b["mask"])))[:n])
        return np.concatenate(out)


def recalls(rankings: np.ndarray, targets, query_instances, gallery_instances, ks=KS, id_ks=ID_KS) -> dict:
    """R@K (the target within the first K) and R_ID@K (an image showing the query's instance), in percent."""
    rankings = np.asarray(rankings)
    hit = rankings == np.asarray(targets)[:, None]
    shows = np.array([[query_instances[q] in gallery_instances[g] for g in row] for q, row in enumerate(rankings)])
    out = {f"R@{k}": float(hit[:, :k].any(axis=1).mean() * 100.0) for k in ks}
    out.update({f"R_ID@{k}": float(shows[:, :k].any(axis=1).mean() * 100.0) for k in id_ks})
    out["avg"] = float(np.mean([out["R@1"], out["R@5"]]))
    return out


def rank(query: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Top-k gallery indices per query by dot product (ties: lower index first)."""
    k = min(k, len(gallery))
    _, idx = topk_retrieval(jnp.asarray(query), jnp.asarray(gallery)[:, None, :], k,
                            chunk_size=min(2048, len(gallery)), query_chunk=min(512, len(query)))
    return np.asarray(idx)


def write(workdir: epath.Path, metrics: dict, rankings: list[dict]) -> None:
    if jax.process_index() != 0:
        return
    metrics_lib.write_metrics(workdir, metrics)
    metrics_lib.write_rankings(workdir, rankings)


def _blocks(n: int, size: int, make):
    for s in range(0, n, size):
        yield make(range(s, min(n, s + size)))


def evaluate(task, model, workdir: epath.Path) -> dict:
    """Evaluates `model` on the task's val data (fake pool or ``data.val_dir``) and writes the outputs."""
    cfg = task.config
    embedder = Embedder(model, int(cfg.eval.batch_size))
    bs = embedder.batch_size
    if cfg.data.source == "fake":
        from idmr_jax.tasks.idmr.fake import eval_arrays

        a = eval_arrays(task.fake_spec())
        take = lambda p: lambda rows: {k: a[f"{p}_{k}"][list(rows)] for k in ("pixels", "ids", "mask")}  # noqa: E731
        q = embedder(_blocks(len(a["query_ids"]), bs, take("query")))
        g = embedder(_blocks(len(a["gallery_ids"]), bs, take("gallery")))
        targets = a["targets"]
        q_inst = a["gallery_instances"][targets].tolist()
        g_inst = [[x] for x in a["gallery_instances"].tolist()]
        g_names = [f"image_{i:05d}" for i in range(len(g))]
        q_names = [f"query_{i:05d}" for i in range(len(q))]
    else:
        from idmr_jax.tasks.idmr import pipeline as P

        es = P.eval_set_from_shards(os.path.join(cfg.data.val_dir, cfg.data.val_glob), query_crop=cfg.eval.query_crop,
                                    max_queries=cfg.eval.max_queries)
        tok = P.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("query"))
        cand_tok = P.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("candidate"))
        prompts = P.Prompts(cfg.data.query_template, cfg.data.candidate_template)
        size, pad = cfg.data.image_size, cfg.data.pad_ratio
        recs = es.records

        def queries(rows):
            ids, mask = tok.batch([prompts.query_text(recs[es.query_records[i]].caption) for i in rows])
            pix = np.stack([P.pixels(recs[es.crop_records[i]].crop_jpeg, size, pad, source=f"val record "
                                     f"{es.crop_records[i]} field 'crop_jpeg'") for i in rows])
            return {"pixels": pix, "ids": ids, "mask": mask}

        def gallery(rows):
            ids, mask = cand_tok.batch([prompts.candidate] * len(rows))
            pix = np.stack([P.pixels(recs[es.gallery_records[i]].image_jpeg, size, pad, source=f"val record "
                                     f"{es.gallery_records[i]} field 'image_jpeg'") for i in rows])
            return {"pixels": pix, "ids": ids, "mask": mask}

        q = embedder(_blocks(len(es.query_records), bs, queries))
        g = embedder(_blocks(len(es.gallery_records), bs, gallery))
        targets = np.asarray(es.targets)
        q_inst = [recs[i].instance_id for i in es.query_records]
        g_inst, g_names = es.gallery_instances, es.gallery_names
        q_names = [recs[i].annotation_id for i in es.query_records]
        logging.info("IDMR eval: %d queries, %d gallery images, skipped %s", len(q), len(g), es.skipped)
    rankings = rank(q, g, max(KS))
    metrics = recalls(rankings, targets, q_inst, g_inst)
    print(f"IDMR eval: {len(q)} queries against {len(g)} gallery images")
    records = [{"query_id": n, "target": g_names[t], "ranking": [g_names[j] for j in row]}
               for n, t, row in zip(q_names, targets.tolist(), rankings.tolist())]
    write(workdir, metrics, records)
    return metrics
