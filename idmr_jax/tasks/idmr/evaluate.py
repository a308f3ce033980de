"""IDMR instance retrieval evaluation: embed queries and gallery, rank, R@K and R_ID@K, write the results.

Protocol (IDMR-bench style): a query is the crop of an instance taken from one image plus the location caption of
*another* image showing the same instance; the gallery holds every full image of the split (the crop's own image
included, as a distractor that matches the object but not the scene). R@K: the target image is among the top K;
R_ID@K: some image showing the query's instance is (the object found, whatever the scene). Percentages.

Outputs: ``WORKDIR/eval/metrics.json`` (flat ``{"R@1": ..., "R_ID@1": ..., "avg": mean of R@1 and R@5}``) and
``WORKDIR/eval/rankings.jsonl`` (top 10 gallery names per query), written through etils.epath (gs:// works) by
process 0. Embeddings are computed in padded blocks of ``eval.batch_size`` rows sharded over the mesh of
``config.sharding`` (`idmr_jax.evaluation.blocks`).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.blocks import BlockEncoder
from idmr_jax.evaluation.ranking import rank_gallery

KS = (1, 5, 10)
ID_KS = (1, 5)


def recalls(rankings: np.ndarray, targets, query_instances, gallery_instances, ks=KS, id_ks=ID_KS) -> dict:
    """R@K (the target within the first K) and R_ID@K (an image showing the query's instance), in percent."""
    rankings = np.asarray(rankings)
    hit = rankings == np.asarray(targets)[:, None]
    shows = np.array([[query_instances[q] in gallery_instances[g] for g in row] for q, row in enumerate(rankings)])
    out = {f"R@{k}": float(hit[:, :k].any(axis=1).mean() * 100.0) for k in ks}
    out.update({f"R_ID@{k}": float(shows[:, :k].any(axis=1).mean() * 100.0) for k in id_ks})
    out["avg"] = float(np.mean([out["R@1"], out["R@5"]]))
    return out


def evaluate(task, model, workdir: epath.Path) -> dict:
    """Evaluates `model` on the task's val data (fake pool or ``data.val_dir``) and writes the outputs."""
    cfg = task.config
    enc = BlockEncoder.from_config(model, cfg)
    embed = enc.program(lambda m, pixels, ids, mask: m.embed(ids, mask, pixels).astype(jnp.float32))
    if cfg.data.source == "fake":
        from idmr_jax.tasks.idmr.fake import eval_arrays

        a = eval_arrays(task.fake_spec())
        take = lambda p: lambda rows: {k: a[f"{p}_{k}"][list(rows)] for k in ("pixels", "ids", "mask")}  # noqa: E731
        q = enc.run_rows(embed, len(a["query_ids"]), take("query"))
        g = enc.run_rows(embed, len(a["gallery_ids"]), take("gallery"))
        targets = a["targets"]
        q_inst = a["gallery_instances"][targets].tolist()
        g_inst = [[x] for x in a["gallery_instances"].tolist()]
        g_names = [f"image_{i:05d}" for i in range(len(g))]
        q_names = [f"query_{i:05d}" for i in range(len(q))]
    else:
        from idmr_jax.tasks.idmr import pipeline

        es = pipeline.eval_set_from_shards(os.path.join(cfg.data.val_dir, cfg.data.val_glob),
                                           query_crop=cfg.eval.query_crop, max_queries=cfg.eval.max_queries)
        tok = pipeline.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("query"))
        cand_tok = pipeline.PromptTokenizer(cfg.data.tokenizer, task.prompt_spec("candidate"))
        prompts = pipeline.Prompts(cfg.data.query_template, cfg.data.candidate_template)
        size, pad = cfg.data.image_size, cfg.data.pad_ratio
        recs = es.records

        def queries(rows):
            ids, mask = tok.batch([prompts.query_text(recs[es.query_records[i]].caption) for i in rows])
            pix = np.stack([pipeline.pixels(recs[es.crop_records[i]].crop_jpeg, size, pad, source=f"val record "
                                            f"{es.crop_records[i]} field 'crop_jpeg'") for i in rows])
            return {"pixels": pix, "ids": ids, "mask": mask}

        def gallery(rows):
            ids, mask = cand_tok.batch([prompts.candidate] * len(rows))
            pix = np.stack([pipeline.pixels(recs[es.gallery_records[i]].image_jpeg, size, pad, source=f"val record "
                                            f"{es.gallery_records[i]} field 'image_jpeg'") for i in rows])
            return {"pixels": pix, "ids": ids, "mask": mask}

        q = enc.run_rows(embed, len(es.query_records), queries)
        g = enc.run_rows(embed, len(es.gallery_records), gallery)
        targets = np.asarray(es.targets)
        q_inst = [recs[i].instance_id for i in es.query_records]
        g_inst, g_names = es.gallery_instances, es.gallery_names
        q_names = [recs[i].annotation_id for i in es.query_records]
        logging.info("IDMR eval: %d queries, %d gallery images, skipped %s", len(q), len(g), es.skipped)
    rankings = rank_gallery(q, g, max(KS))
    metrics = recalls(rankings, targets, q_inst, g_inst)
    print(f"IDMR eval: {len(q)} queries against {len(g)} gallery images")
    records = [{"query_id": n, "target": g_names[t], "ranking": [g_names[j] for j in row]}
               for n, t, row in zip(q_names, targets.tolist(), rankings.tolist())]
    outputs.write_results(workdir, metrics, records)
    return metrics
