"""Zero-shot CIR evaluation of the universal demo (`idmr_jax.tasks.universal.demo`'s val shards).

Every val image is a candidate (candidate prompt of modality "image"); every query is the reference image with the
modification text (query prompt of modality "image,text", no instruction), from ``config.data.prompt_set``. Each
query ranks the whole gallery (`idmr_jax.evaluation.ranking.rank_gallery`: equal scores keep the lower candidate
index first), and, as OACIRR's protocol does (`idmr_jax.tasks.oacir.metrics`), its reference image is removed from
its ranking before counting:

- ``demo_cir/R@K`` (K 1, 5, 10): the target is in the first K;
- ``demo_cir/R_ID@K`` (K 1, 5): some image of the query's instance (``extra["instance_positives"]``: every val
  image of the target's instance, which is the reference's) is in the first K.

Values are percentages. Writes ``WORKDIR/eval/demo_cir/metrics.json`` and ``rankings.jsonl`` (``{"query_id",
"ranking": [did, ...]}``, the whole gallery without the reference). `cir_metrics` and `ranking_records` are plain
NumPy (testable without a model); `evaluate_demo_cir` runs the embedder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from idmr_jax.tasks.oacir.metrics import remove_reference

CIR_KEY = "demo_cir"
RECALL_KS = (1, 5, 10)
ID_KS = (1, 5)

__all__ = ["CIR_KEY", "ID_KS", "RECALL_KS", "cir_metrics", "evaluate_demo_cir", "ranking_records"]


def _gallery_index(gallery: Sequence[str]) -> dict[str, int]:
    where: dict[str, int] = {}
    for i, did in enumerate(gallery):
        if where.setdefault(did, i) != i:
            raise ValueError(f"candidate {did!r} appears twice in the gallery (indices {where[did]} and {i})")
    return where


def _cleaned(rankings, gallery: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """``[Nq, L-1]`` rankings with each query's reference removed (`remove_reference`)."""
    where = _gallery_index(gallery)
    ref = np.array([where.get(r, -1) for r in references], np.int64)
    return remove_reference(np.asarray(rankings), ref)


def cir_metrics(rankings, *, gallery: Sequence[str], query_ids: Sequence[str], references: Sequence[str],
                targets: Sequence[str], instance_positives: Sequence[Sequence[str]],
                ks: Sequence[int] = RECALL_KS, id_ks: Sequence[int] = ID_KS, prefix: str = CIR_KEY
                ) -> dict[str, float]:
    """``{"<prefix>/R@K": %, "<prefix>/R_ID@K": %}`` from ``[Nq, Ng]`` full rankings (gallery indices, best first).

    `gallery` holds the candidates' dids; per query, its reference's and target's did and its instance's dids.
    ValueError naming the query when its target is not in the gallery or is its own reference."""
    rankings = np.asarray(rankings)
    n = len(query_ids)
    if not (rankings.shape[0] == len(references) == len(targets) == len(instance_positives) == n):
        raise ValueError(f"{rankings.shape[0]} rankings for {n} queries, {len(references)} references, "
                         f"{len(targets)} targets, {len(instance_positives)} instance lists")
    where = _gallery_index(gallery)
    if rankings.shape[1] != len(gallery):
        raise ValueError(f"rankings have {rankings.shape[1]} entries per query; expected the full gallery "
                         f"({len(gallery)})")
    for qid, ref, tgt in zip(query_ids, references, targets):
        if tgt not in where:
            raise ValueError(f"query {qid}: target {tgt!r} is not in the gallery")
        if tgt == ref:
            raise ValueError(f"query {qid}: target {tgt!r} is its own reference, removed from the ranking")
    cleaned = _cleaned(rankings, gallery, references)
    never = np.iinfo(np.int64).max
    tgt_rank = np.array([int(np.flatnonzero(row == where[t])[0]) for row, t in zip(cleaned, targets)], np.int64)
    id_rank = np.full(n, never, np.int64)
    for i, (row, dids) in enumerate(zip(cleaned, instance_positives)):
        wanted = np.array([where[d] for d in dids if d in where], np.int64)
        hits = np.flatnonzero(np.isin(row, wanted))
        if hits.size:
            id_rank[i] = hits[0]
    out = {f"{prefix}/R@{k}": float(np.mean(tgt_rank < k) * 100.0) for k in ks}
    out.update({f"{prefix}/R_ID@{k}": float(np.mean(id_rank < k) * 100.0) for k in id_ks})
    return out


def ranking_records(rankings, *, gallery: Sequence[str], query_ids: Sequence[str],
                    references: Sequence[str]) -> list[dict]:
    """One ``{"query_id", "ranking": [did, ...]}`` per query, best first, its reference removed."""
    names = np.asarray(gallery, dtype=object)
    return [{"query_id": qid, "ranking": names[row].tolist()}
            for qid, row in zip(query_ids, _cleaned(rankings, gallery, references))]


def evaluate_demo_cir(task, model, workdir) -> dict:
    """Zero-shot CIR on the demo's val shards in ``config.data.val_dir``; writes the outputs, returns the metrics."""
    import jax

    from idmr_jax.evaluation import outputs
    from idmr_jax.evaluation.ranking import rank_gallery
    from idmr_jax.tasks.universal.evaluate import embed_split

    # The texts cleaned as in training (`idmr_jax.tasks.universal.pipeline`): UniIR's clean-up, no instruction.
    queries, index, qry, cand = embed_split(task, model, task.config.data.val_dir)
    rankings = rank_gallery(qry, cand, top=len(index))
    gallery = index.dids
    extras = [q.extra_fields for q in queries]
    qids = [q.qid for q in queries]
    refs = [e["reference"] for e in extras]
    metrics = cir_metrics(rankings, gallery=gallery, query_ids=qids, references=refs,
                          targets=[q.positives[0] for q in queries],
                          instance_positives=[e["instance_positives"] for e in extras])
    if jax.process_index() == 0:
        outputs.write_results(workdir, metrics, ranking_records(rankings, gallery=gallery, query_ids=qids,
                                                                references=refs), subdir=CIR_KEY)
    print(f"{CIR_KEY}: {len(queries)} queries against {len(index)} candidates: "
          + ", ".join(f"{k.split('/', 1)[1]} {v:.1f}" for k, v in metrics.items()))
    return metrics
