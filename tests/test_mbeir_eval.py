"""M-BEIR end to end: the release fixture converted, a tiny random MLLM embedder evaluated on the local and the
global pools, and ``metrics.json`` recomputed from ``rankings.jsonl`` by an independent implementation of UniIR's
recall (a hit rate: any qrels positive in the top K)."""

import json
from pathlib import Path

import numpy as np
import pytest

import mbeir_fixtures as fx
from idmr_jax.tasks.universal import mbeir_convert, records
from idmr_jax.tasks.universal.prompts import DEFAULT, load_prompt_set

WIDE = ("fashion200k_task0", "fashion200k_task3", "fashioniq_task7")  # retrieval.yaml: R@10/20/50


def _evaluate(workdir, **fields):
    from configs import mbeir
    from idmr_jax import tasks
    from idmr_jax.train import trainer

    config = mbeir.get_config("tiny")
    for dotted, value in fields.items():
        section, leaf = dotted.split("__")
        config[section][leaf] = value
    return trainer.evaluate_only(tasks.build(config), str(workdir))


def independent_recall(queries, rankings) -> dict[str, float]:
    by_key = {}
    for q in queries:
        by_key.setdefault(q.extra_fields["key"], []).append(q)
    out, headline = {}, []
    for key, qs in by_key.items():
        ks = (10, 20, 50) if key in WIDE else (1, 5, 10)
        for k in ks:
            out[f"mbeir/{key}/R@{k}"] = 100.0 * np.mean([bool(set(q.positives) & set(rankings[q.qid][:k]))
                                                         for q in qs])
        headline.append(out[f"mbeir/{key}/R@{10 if key in WIDE else 5}"])
    out["mbeir/avg/headline"] = float(np.mean(headline))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["local", "global"])
def test_mbeir_metrics_are_recomputed_from_the_rankings(pool, tmp_path):
    info = fx.write_mbeir(str(tmp_path / "release"))
    shards = tmp_path / "ar"
    mbeir_convert.convert(str(tmp_path / "release"), "test", str(shards), keys=info["keys"], pool=pool)
    metrics = _evaluate(tmp_path / "w", data__val_dir=str(shards), eval__pool=pool)
    ev = tmp_path / "w" / "eval" / "mbeir"
    assert json.loads((ev / "metrics.json").read_text()) == pytest.approx(metrics)
    rankings = {r["query_id"]: r["ranking"] for r in map(json.loads, (ev / "rankings.jsonl").read_text().splitlines())}
    queries = records.read_queries(str(shards / "queries-*.array_record"))
    candidates = records.read_candidates(str(shards / "candidates-*.array_record"))
    assert sorted(rankings) == sorted(q.qid for q in queries)  # every labelled query, once
    for q in queries:
        ranked = rankings[q.qid]
        pool_dids = [c.did for c in candidates
                     if pool == "global" or q.extra_fields["pool"] in c.extra_fields["pools"]]
        assert len(set(ranked)) == len(ranked) == min(50, len(pool_dids)) and set(ranked) <= set(pool_dids)
    assert metrics == pytest.approx(independent_recall(queries, rankings))
    assert set(k.split("/")[1] for k in metrics) == set(info["keys"]) | {"avg"}


def test_prompt_sets_are_data_and_checked(tmp_path):
    default = load_prompt_set()
    assert {m: (t,) for m, t in json.loads(Path(DEFAULT).read_text())["query"].items()} == default["query"]
    broken = json.loads(Path(DEFAULT).read_text())
    broken["candidate"]["text"] = "<image> {text}"  # a text-only side cannot hold an image
    (tmp_path / "p.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="candidate.text"):
        load_prompt_set(str(tmp_path / "p.json"))
