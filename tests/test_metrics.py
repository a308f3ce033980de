"""OACIR metrics on hand-built rankings with known answers."""

import json

import numpy as np
import pytest

from idmr_jax.evaluation import outputs
from idmr_jax.evaluation.ranking import rank_scores
from idmr_jax.tasks.oacir import metrics as M
from idmr_jax.evaluation.retrieval import topk_numpy

NAMES = ["a0", "a1", "a2", "b0", "b1", "c0"]
INST = ["A", "A", "A", "B", "B", "C"]
IDX = {n: i for i, n in enumerate(NAMES)}


def _rank(*names):
    return [IDX[n] for n in names]


def _recalls(rankings, refs, tgts, **kw):
    return M.compute_recalls(
        np.asarray(rankings), gallery_names=NAMES, gallery_instances=INST, reference_names=refs, target_names=tgts, **kw
    )


def test_rank_scores_ties_lower_index_first():
    s = np.array([[0.5, 0.9, 0.9, 0.1, 0.9, 0.5]])
    np.testing.assert_array_equal(rank_scores(s), [[1, 2, 4, 0, 5, 3]])


def test_reference_ranked_first_is_removed():
    # Ranking a0 (reference) > b0 > a2 (target) > a1 > b1 > c0. Without a0: b0, a2, a1, ...
    r = _recalls([_rank("a0", "b0", "a2", "a1", "b1", "c0")], ["a0"], ["a2"], ks=(1, 2, 5), id_ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": 100.0, "R@5": 100.0, "R_ID@1": 0.0, "R_ID@2": 100.0, "R_ID@3": 100.0}


def test_instance_with_several_gallery_images():
    # Target a2 is 4th after removal, but a1 (same instance, not the target) is 2nd: R_ID@2 hits before R@K.
    r = _recalls([_rank("b0", "a1", "a0", "c0", "a2", "b1")], ["a0"], ["a2"], ks=(1, 3, 4), id_ks=(1, 2))
    assert r == {"R@1": 0.0, "R@3": 0.0, "R@4": 100.0, "R_ID@1": 0.0, "R_ID@2": 100.0}


def test_ties_from_scores():
    # a0 and a1 tie at the top; the lower index (a0) ranks first, so target a1 misses R@1 but R_ID@1 hits.
    scores = np.array([[0.9, 0.9, 0.2, 0.3, 0.1, 0.0]])
    r = _recalls(rank_scores(scores), ["c0"], ["a1"], ks=(1, 2), id_ks=(1,))
    assert r == {"R@1": 0.0, "R@2": 100.0, "R_ID@1": 100.0}


def test_multiple_queries_and_default_ks():
    rankings = [
        _rank("a0", "b0", "a2", "a1", "b1", "c0"),  # target a2: place 2 after removal
        _rank("b1", "b0", "a0", "a1", "a2", "c0"),  # target b1: place 1 (reference b0 removed)
        _rank("c0", "a0", "a1", "a2", "b1", "b0"),  # target b1 of reference b0: place 5
    ]
    r = _recalls(rankings, ["a0", "b0", "b0"], ["a2", "b1", "b1"], query_ids=["q0", "q1", "q2"])
    third = 100.0 / 3
    assert r["R@1"] == pytest.approx(third)
    assert r["R@5"] == pytest.approx(100.0)
    assert r["R@10"] == r["R@50"] == pytest.approx(100.0)  # fewer than K items left: everything counts
    assert r["R_ID@1"] == pytest.approx(third)  # q1 only (q0 has b0 first, q2 has c0 first)
    assert r["R_ID@3"] == pytest.approx(2 * third)  # q2's first B image (b1) is 5th
    assert r["R_ID@5"] == pytest.approx(100.0)


def test_query_instances_override():
    # The released code looks for the target's instance; an explicit per-query instance replaces it.
    rk = [_rank("a0", "c0", "a2", "a1", "b1", "b0")]
    assert _recalls(rk, ["a0"], ["a2"], id_ks=(1,), ks=(1,))["R_ID@1"] == 0.0
    assert _recalls(rk, ["a0"], ["a2"], id_ks=(1,), ks=(1,), query_instances=["C"])["R_ID@1"] == 100.0


def test_target_absent_or_self_raises_with_query_name():
    with pytest.raises(ValueError, match="query q7.*'zz'"):
        _recalls([_rank("a0", "a1", "a2", "b0", "b1", "c0")], ["a0"], ["zz"], query_ids=["q7"])
    with pytest.raises(ValueError, match="query #0"):
        _recalls([_rank("a0", "a1", "a2", "b0", "b1", "c0")], ["a0"], ["a0"])


def test_truncated_topk_equals_full_ranking():
    rng = np.random.default_rng(0)
    ng, nq = 80, 12
    names = [f"img{i}" for i in range(ng)]
    inst = [f"inst{i // 4}" for i in range(ng)]
    scores = np.round(rng.normal(size=(nq, ng)), 1)  # coarse values: many ties
    refs = [names[i] for i in rng.integers(0, ng, nq)]
    tgts = [names[(names.index(r) + 1) % ng] for r in refs]
    kw = dict(gallery_names=names, gallery_instances=inst, reference_names=refs, target_names=tgts)
    kw.update(ks=(1, 5, 10), id_ks=(1, 5))
    full = M.compute_recalls(rank_scores(scores), **kw)
    # A top-11 list from the retrieval reference (same tie rule) gives the same numbers. One-hot queries
    # against gallery[g, 0, q] = scores[q, g] reproduce the score matrix exactly.
    scores = scores.astype(np.float32)
    _, top = topk_numpy(np.eye(nq, dtype=np.float32), scores.T[:, None, :], 11)
    np.testing.assert_array_equal(top, rank_scores(scores)[:, :11])
    assert M.compute_recalls(top, **kw) == full
    with pytest.raises(ValueError, match="cannot give @10"):
        M.compute_recalls(top[:, :10], **kw)


def test_aggregate_and_write(tmp_path):
    per = {
        "fashion": {"R_ID@1": 80.0, "R@1": 60.0, "R@5": 90.0, "R@10": 95.0},
        "car": {"R_ID@1": 70.0, "R@1": 50.0, "R@5": 85.0, "R@10": 92.0},
    }
    flat = M.aggregate(per)
    assert flat["fashion/R_ID@1"] == 80.0 and flat["car/R@10"] == 92.0
    assert flat["avg"] == pytest.approx((80 + 60 + 90 + 70 + 50 + 85) / 6)
    path = outputs.write_metrics(tmp_path, flat)
    assert path == str(tmp_path / "eval" / "metrics.json")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == flat

    recs = M.ranking_records(
        np.array([_rank("a0", "b0", "a2", "a1", "b1", "c0")]),
        query_ids=["q0"],
        subset="fashion",
        gallery_names=NAMES,
        reference_names=["a0"],
        top=3,
    )
    assert recs == [{"query_id": "q0", "subset": "fashion", "ranking": ["b0", "a2", "a1"]}]
    outputs.write_rankings(tmp_path, recs + recs)
    lines = (tmp_path / "eval" / "rankings.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == recs + recs
