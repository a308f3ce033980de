"""The retrieve-mine-rerank loop (configs/rerank.py:demo, idmr_jax/tasks/rerank/loop.py): the steps' configs chain
the right data and weights, and the whole loop runs on the tiny demo with results that must agree with each other:
the reranker reranks the retrained embedder's own rankings, only inside the top 5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idmr_jax.config_args import sibling_config

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = ("retrieval", "mined", "rerank_pointwise", "rerank_listwise", "rerank_fused")
METRICS = ("R@1", "R@5", "R@10", "R_ID@1", "R_ID@5")


def _config(arg):
    return sibling_config(str(ROOT / "configs" / "rerank.py"), "rerank.py").get_config(arg)


def test_step_configs_chain_data_and_weights():
    from idmr_jax.tasks.rerank.loop import step_config

    cfg = _config("demo")
    first = step_config(cfg, cfg.loop.retrieval)
    assert "loop" not in first and first.task == "universal" and first.data.source == "demo"
    assert first.data.demo_stage == "cir_pairs" and first.data.num_hard_negatives == 0
    mined = step_config(cfg, cfg.loop.mined, train_dir="/w/mined_pairs", val_dir="/v", init_path="/w/retrieval")
    assert (mined.task, mined.data.source, mined.data.num_hard_negatives) == ("universal", "arrayrecord", 2)
    assert (mined.model.init.format, mined.model.init.path) == ("workdir", "/w/retrieval")
    assert (mined.data.train_dir, mined.data.val_dir) == ("/w/mined_pairs", "/v")
    reranker = step_config(cfg, cfg.loop.reranker, train_dir="/w/mined_pairs", val_dir="/v", init_path="/w/mined")
    assert reranker.task == "rerank" and reranker.model.lora.rank > 0 and reranker.model.init.path == "/w/mined"
    assert reranker.eval.at_end and reranker.eval.benchmark == "demo_cir" and reranker.rerank.k == 5
    with pytest.raises(ValueError, match="no such field"):
        step_config(cfg, [("loss.temprature", 1.0)])


def test_loop_chains_the_steps_and_reuses_an_embedder(tmp_path, monkeypatch):
    """The order of the steps and what each starts from; with ``loop.embedder_workdir`` the given embedder is only
    evaluated (into WORKDIR/retrieval), then indexed, mined from and trained further."""
    from idmr_jax.tasks.rerank import loop

    mined_from = []
    monkeypatch.setattr(loop, "_demo_dirs", lambda config: ("/demo/train", "/demo/val"))
    monkeypatch.setattr(loop, "_index_and_mine", lambda config, embedder, train, work: mined_from.append(
        (embedder, train)) or {"pairs": 3})
    for reuse in ("", "/w0"):
        calls, mined_from[:] = [], []
        cfg = _config("demo")
        cfg.loop.embedder_workdir = reuse

        def run(config, workdir, calls=calls):
            calls.append((config, workdir))
            return {"demo_cir/R@1": float(len(calls))}

        work = tmp_path / (reuse.strip("/") or "fresh")
        results = loop.run_loop(cfg, str(work), run)
        (first, first_dir), (mined, mined_dir), (control, control_dir), (reranker, reranker_dir) = calls
        first_embedder = reuse or str(work / "retrieval")
        assert first_dir == str(work / "retrieval") and first.mode == ("eval" if reuse else "train")
        assert first.model.init.path == reuse and (first.model.init.format == "workdir") == bool(reuse)
        assert mined_from == [(first_embedder, "/demo/train")]
        assert (mined_dir, mined.model.init.path) == (str(work / "mined"), first_embedder)
        assert mined.data.train_dir == str(work / "mined_pairs") == reranker.data.train_dir
        assert mined.data.val_dir == "/demo/val" == reranker.data.val_dir == control.data.val_dir
        # The control trains as long from the same start, on the pairs without mined negatives.
        assert (control_dir, control.model.init.path, control.data.train_dir) == (str(work / "control"),
                                                                                   first_embedder, "/demo/train")
        assert control.data.num_hard_negatives == mined.data.num_hard_negatives == 2
        assert (reranker_dir, reranker.model.init.path, reranker.task) == (str(work / "reranker"), str(work / "mined"),
                                                                             "rerank")
        assert results == {"retrieval/demo_cir/R@1": 1.0, "mined/demo_cir/R@1": 2.0, "control/demo_cir/R@1": 3.0,
                           "demo_cir/R@1": 4.0}
        assert json.loads((work / "metrics.json").read_text()) == results


def _read_jsonl(path: Path) -> dict[str, list[str]]:
    return {r["query_id"]: r["ranking"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_tiny_loop_end_to_end(tmp_path):
    from idmr_jax import tasks
    from idmr_jax.tasks.rerank.loop import run_loop
    from idmr_jax.train import trainer

    cfg = _config("demo,tiny")
    cfg.data.demo_cache = str(tmp_path / "cache")
    cfg.train.num_steps, cfg.train.checkpoint_every, cfg.train.log_every = 2, 2, 1
    cfg.train.async_checkpoints, cfg.train.progress = False, False
    cfg.loop.mining.k = 20
    cfg.loop.control = []  # its config is checked above; here it would only add a training

    def run_one(config, workdir):
        task = tasks.build(tasks.prepare_data(config))
        if config.mode == "eval":
            return trainer.evaluate_only(task, workdir)
        return trainer.train_and_evaluate(task, workdir)

    work = tmp_path / "w"
    results = run_loop(cfg, str(work), run_one)
    assert json.loads((work / "metrics.json").read_text()) == pytest.approx(results)
    for block in BLOCKS:
        assert {m for m in METRICS if f"{block}/demo_cir/{m}" in results} == set(METRICS), block
    # The reranker reranked the retrained embedder's rankings: its retriever block is the `mined` step's result.
    for m in METRICS:
        assert results[f"retriever/demo_cir/{m}"] == pytest.approx(results[f"mined/demo_cir/{m}"])
    # Reranking the top 5 changes neither which candidates are in it nor anything below it.
    for block in BLOCKS[2:]:
        for m in ("R@5", "R@10", "R_ID@5"):
            assert results[f"{block}/demo_cir/{m}"] == pytest.approx(results[f"mined/demo_cir/{m}"])
    before = _read_jsonl(work / "mined" / "eval" / "demo_cir" / "rankings.jsonl")
    for mode in ("pointwise", "listwise", "fused"):
        after = _read_jsonl(work / "reranker" / "eval" / f"rerank_{mode}" / "rankings.jsonl")
        assert after.keys() == before.keys()
        for qid, ranking in after.items():
            assert ranking[5:] == before[qid][5:] and sorted(ranking[:5]) == sorted(before[qid][:5]), (mode, qid)
    # Mining used the first embedder and never mined a positive of the pair's instance.
    manifest = json.loads((work / "mined_pairs" / "manifest.json").read_text())
    assert str(work / "retrieval") in json.dumps(manifest) and manifest["counts"]["mined_negatives"] > 0
    from idmr_jax.tasks.universal import records

    for pair in records.read_pairs(str(work / "mined_pairs" / "train-*.array_record")):
        marked = set(pair.extra_fields["instance_positives"]) | {pair.positive.id}
        assert not marked & {n.id for n in pair.negatives}, pair.pair_id
