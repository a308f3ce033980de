"""The CAAM studies (`idmr_jax.analysis`): one real study on the tiny config (fake data, a few steps, two seeds),
and the tables on hand-made run folders (known metrics, so means and spreads are checked exactly)."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest

from idmr_jax.analysis import __main__ as cli
from idmr_jax.analysis import caam
from idmr_jax.analysis import runs as study

TINY = "configs/oacir.py:tiny"
SEEDS, BETAS = 2, [2.0]


def _short(config):
    """The tiny config cut to a few steps: the tests check the bookkeeping, not the learning."""
    t = config.train
    t.num_steps, t.checkpoint_every, t.log_every, t.progress = 4, 4, 2, False
    config.data.fake_pool = 12
    return config


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A finished tiny study: learned, baseline and beta=2 at seeds 0 and 1; learned also under no_box."""
    root = str(tmp_path_factory.mktemp("study"))
    real = study.default_runner()
    calls = []

    def runner(config, workdir):
        calls.append((config.mode, config.seed, config.model.beta_mode, config.eval.box_perturbation, workdir))
        return real(_short(config), workdir)

    written = caam.run_study(TINY, SEEDS, BETAS, root, perturbed=["learned"], kinds=["no_box"], runner=runner)
    return root, written, calls


def _lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def test_sweep_points_come_from_their_configs(tiny_study):
    root, written, calls = tiny_study
    trained = [c for c in calls if c[0] == "train"]
    assert sorted((s, m) for _, s, m, _, _ in trained) == sorted(
        (s, m) for m in ("adaptive", "none", "fixed") for s in range(SEEDS))
    for run in study.plan_runs(TINY, SEEDS, BETAS, root):
        saved = study.saved_config(run.workdir)
        assert int(saved.seed) == int(saved.data.shuffle_seed) == run.seed
        assert saved.model.beta_mode == {"learned": "adaptive", "baseline": "none"}.get(run.name, "fixed")
        if run.name == "beta2":
            assert saved.model.fixed_beta == 2.0
    with open(written["fixed_beta"]) as f:
        sweep = json.load(f)
    # beta = 0 is the baseline's runs (the same model bit for bit), not a run of its own
    assert [(p["beta"], p["name"]) for p in sweep["points"]] == [(0.0, "baseline"), (2.0, "beta2")]
    assert not os.path.exists(os.path.join(root, "runs", "beta0"))
    for name, entry in [("beta2", sweep["points"][1]), ("learned", sweep["learned"]), ("baseline", sweep["baseline"]),
                        ("baseline", sweep["points"][0])]:
        assert entry["seeds"] == list(range(SEEDS))
        per_seed = [caam.read_metrics(os.path.join(root, "runs", name, f"seed{s}", "eval", "metrics.json"))
                    for s in range(SEEDS)]
        for metric in caam.METRICS:
            values = [p[metric] for p in per_seed]
            assert entry[metric]["values"] == pytest.approx(values)
            assert entry[metric]["mean"] == pytest.approx(np.mean(values))
            assert entry[metric]["std"] == pytest.approx(np.std(values, ddof=1))


def test_betas_written_for_learned_and_fixed_only(tiny_study):
    root, _, _ = tiny_study
    for s in range(SEEDS):
        run = os.path.join(root, "runs", "{}", f"seed{s}", "eval")
        assert not os.path.exists(os.path.join(run.format("baseline"), "betas.jsonl"))
        fixed = _lines(os.path.join(run.format("beta2"), "betas.jsonl"))
        assert [r["beta"] for r in fixed] == pytest.approx([2.0] * len(fixed))
        learned = _lines(os.path.join(run.format("learned"), "betas.jsonl"))
        ranked = _lines(os.path.join(run.format("learned"), "rankings.jsonl"))
        assert [r["query_id"] for r in learned] == [r["query_id"] for r in ranked]
        assert all(r["beta"] >= 0 for r in learned)
        fractions = [r["box_area_fraction"] for r in learned]
        assert None in fractions  # the fake pool leaves every fourth query without a box
        assert all(0 < f <= 1 for f in fractions if f is not None)


def test_rankings_name_reference_and_target_and_rescore_to_the_metrics(tiny_study):
    # context_table scores records on their own: each must name its reference and target, and R@1 recomputed from
    # the records must be the evaluation's own R@1 (per subset).
    root, written, _ = tiny_study
    for s in range(SEEDS):
        records = _lines(os.path.join(root, "runs", "baseline", f"seed{s}", "eval", "rankings.jsonl"))
        with open(os.path.join(root, "runs", "baseline", f"seed{s}", "eval", "metrics.json")) as f:
            metrics = json.load(f)
        assert all(r["reference"] not in r["ranking"] for r in records)
        for subset in {r["subset"] for r in records}:
            hits = [r["ranking"][0] == r["target"] for r in records if r["subset"] == subset]
            assert 100.0 * np.mean(hits) == pytest.approx(metrics[f"{subset}/R@1"])
    with open(written["by_context"]) as f:
        assert json.load(f)["rows"] == []  # no demo metadata for the fake data: no keep/change table, no plot
    assert "by_context.png" not in written


def test_histogram_counts_every_query_once_per_seed(tiny_study):
    root, written, _ = tiny_study
    with open(written["beta_histogram"]) as f:
        hist = json.load(f)
    per_seed = [_lines(os.path.join(root, "runs", "learned", f"seed{s}", "eval", "betas.jsonl")) for s in range(SEEDS)]
    assert hist["count"] == sum(len(p) for p in per_seed) == SEEDS * 12
    assert sum(hist["histogram"]["counts"]) == hist["count"]
    keys = [(q["seed"], q["query_id"]) for q in hist["queries"]]
    assert len(set(keys)) == len(keys)
    assert {k for k in keys} == {(s, r["query_id"]) for s, p in enumerate(per_seed) for r in p}
    assert hist["beta_mean"] == pytest.approx(np.mean([r["beta"] for p in per_seed for r in p]))


def test_perturbation_table_and_training_curve(tiny_study):
    root, written, calls = tiny_study
    evals = [c for c in calls if c[0] == "eval"]
    assert sorted((s, p) for _, s, _, p, _ in evals) == [(s, "no_box") for s in range(SEEDS)]
    for _, s, _, _, workdir in evals:  # each in its own folder, the run's own eval untouched
        assert workdir == os.path.join(root, "runs", "learned", f"seed{s}", "perturb", "no_box")
        assert os.path.exists(os.path.join(workdir, "eval", "metrics.json"))
    with open(written["box_perturbation"]) as f:
        table = json.load(f)
    assert [(r["model"], r["perturbation"]) for r in table["rows"]] == [
        ("learned", "none"), ("learned", "no_box"), ("baseline", "none"), ("baseline", "no_box")]
    assert all(r["seeds"] == list(range(SEEDS)) for r in table["rows"])
    assert [r.get("box_unused", False) for r in table["rows"]] == [False, False, True, True]
    with open(written["beta_over_training"]) as f:
        curve = json.load(f)
    assert curve["steps"] == [2, 4] and sorted(curve["per_seed"]) == ["0", "1"]
    assert len(curve["over_seeds"]["beta_mean"]["mean"]) == 2


def test_pngs_written(tiny_study):
    _, written, _ = tiny_study
    for name in ("fixed_beta.png", "beta_histogram.png", "beta_over_training.png"):
        with open(written[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _eval_mtimes(root):
    return {k: os.path.getmtime(os.path.join(root, "runs", k, "seed0", "eval", "metrics.json"))
            for k in ("learned", "baseline", "beta2")}


def test_rerun_reuses_finished_runs(tiny_study):
    root, written, _ = tiny_study
    before = _eval_mtimes(root)

    def refuse(config, workdir):
        raise AssertionError(f"retrained {workdir}")

    log = []
    again = caam.run_study(TINY, SEEDS, BETAS, root, perturbed=["learned"], kinds=["no_box"], runner=refuse,
                           plots=False, log=log.append)
    assert sum("reused" in line for line in log) == 3 * SEEDS
    assert _eval_mtimes(root) == before
    with open(again["fixed_beta"]) as f, open(written["fixed_beta"]) as g:
        assert json.load(f) == json.load(g)


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["caam", f"--config={TINY}", "--seeds=2", f"--workdir={tmp_path / 'w'}", "--betas", "0,5",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("train") for line in out) == 2 * 3  # learned, baseline (= beta 0), beta5
    assert sum(line.startswith("eval") for line in out) == 2 * 1 * 3  # learned, 3 perturbations
    assert any("configs/oacir.py:tiny,fixed_beta=5 --config.seed=1" in line for line in out)
    assert not (tmp_path / "w").exists()


def test_plan_refuses_a_baseline_config(tmp_path):
    with pytest.raises(ValueError, match="CAAM config"):
        study.plan_runs("configs/oacir.py:tiny,baseline", 1, [], str(tmp_path))


# ---------------------------------------------------------------- hand-made run folders


def _write_run(root, name, seed, metrics=None, betas=None, train=None):
    run = study.Run(name, "", seed, os.path.join(root, "runs", name, f"seed{seed}"))
    os.makedirs(os.path.join(run.workdir, "eval"), exist_ok=True)
    if metrics is not None:
        with open(run.metrics_path, "w") as f:
            json.dump(metrics, f)
    if betas is not None:
        with open(os.path.join(run.workdir, "eval", "betas.jsonl"), "w") as f:
            f.writelines(json.dumps(b) + "\n" for b in betas)
    if train is not None:
        with open(os.path.join(run.workdir, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in train)
    return run


def _saved(name, seed, beta=0.0):
    mode = {"learned": "adaptive", "baseline": "none"}.get(name, "fixed")
    return ml_collections.ConfigDict({"seed": seed, "model": {"beta_mode": mode, "fixed_beta": beta}})


def test_means_and_stds_on_hand_made_metrics(tmp_path, monkeypatch):
    # Two subsets per run: a run's value is their mean; then mean and sample std over seeds.
    values = {"learned": [60.0, 70.0, 80.0], "baseline": [50.0, 50.0, 56.0], "beta5": [40.0, 44.0, 48.0],
              "beta1": [10.0, 20.0, 30.0]}
    groups = {}
    for name, vals in values.items():
        groups[name] = [_write_run(str(tmp_path), name, s, {"a/R@1": v - 2, "b/R@1": v + 2, "a/R_ID@1": v,
                                                              "b/R_ID@1": v, "avg": 0.0})
                        for s, v in enumerate(vals)]
    betas = {"beta5": 5.0, "beta1": 1.0}
    monkeypatch.setattr(study, "saved_config",
                        lambda w: _saved(w.split(os.sep)[-2], int(w[-1]), betas.get(w.split(os.sep)[-2], 0.0)))
    sweep = caam.fixed_beta_sweep(groups)
    assert [p["beta"] for p in sweep["points"]] == [0.0, 1.0, 5.0]  # sorted by the saved config's beta; 0: baseline
    assert [p["beta"] for p in caam.fixed_beta_sweep(groups, zero_from_baseline=False)["points"]] == [1.0, 5.0]
    for entry, vals in [(sweep["points"][0], values["baseline"]), (sweep["points"][1], values["beta1"]),
                        (sweep["points"][2], values["beta5"]),
                        (sweep["learned"], values["learned"]), (sweep["baseline"], values["baseline"])]:
        for metric in ("R@1", "R_ID@1"):
            assert entry[metric]["values"] == pytest.approx(vals)
            assert entry[metric]["mean"] == pytest.approx(sum(vals) / 3)
            assert entry[metric]["std"] == pytest.approx(float(np.std(vals, ddof=1)))
    assert caam.summarize([3.0]) == {"mean": 3.0, "std": 0.0, "values": [3.0]}


def test_check_saved_rejects_another_runs_config():
    run = study.Run("beta5", "", 1, "/x/runs/beta5/seed1")
    study.check_saved(run, _saved("beta5", 1, 5.0))
    shuffled_elsewhere = _saved("beta5", 1, 5.0)
    shuffled_elsewhere.data = {"shuffle_seed": 0}
    for bad in (_saved("beta5", 1, 2.0), _saved("beta5", 0, 5.0), _saved("learned", 1), shuffled_elsewhere):
        with pytest.raises(ValueError, match="saved config"):
            study.check_saved(run, bad)


def test_perturbation_table_has_every_cell(tmp_path):
    groups = {}
    for name in ("learned", "baseline"):
        groups[name] = []
        for s in range(2):
            run = _write_run(str(tmp_path), name, s, {"x/R@1": 10.0 * s, "x/R_ID@1": 20.0 + s})
            for k, kind in enumerate(study.PERTURBATIONS):
                out = os.path.join(run.perturb_workdir(kind), "eval")
                os.makedirs(out)
                with open(os.path.join(out, "metrics.json"), "w") as f:
                    json.dump({"x/R@1": 10.0 * s - (k + 1), "x/R_ID@1": 20.0 + s}, f)
            groups[name].append(run)
    table = caam.perturbation_table(groups, ["learned", "baseline"])
    cells = [(r["model"], r["perturbation"]) for r in table["rows"]]
    assert cells == [(m, p) for m in ("learned", "baseline") for p in ("none", *study.PERTURBATIONS)]
    for row in table["rows"]:
        k = 0 if row["perturbation"] == "none" else study.PERTURBATIONS.index(row["perturbation"]) + 1
        assert row["R@1"]["values"] == pytest.approx([-k, 10.0 - k])
        assert row["R@1"]["std"] == pytest.approx(float(np.std([0, 10], ddof=1)))
        assert row["R_ID@1"]["mean"] == pytest.approx(20.5)


def test_histogram_context_and_training_curve_on_hand_made_runs(tmp_path):
    meta = {"images": {"r1": {"context": "beach"}, "t1": {"context": "beach"}, "t2": {"context": "forest"}}}
    queries = [{"query_id": "demo/0", "subset": "demo", "beta": 1.0, "reference": "r1", "target": "t1",
                "box_area_fraction": 0.1},
               {"query_id": "demo/1", "subset": "demo", "beta": [3.0, 5.0], "reference": "r1", "target": "t2",
                "box_area_fraction": 0.3}]
    train = [{"step": 10, "split": "train", "beta_mean": 1.0, "beta_std": 0.5},
             {"step": 20, "split": "train", "beta_mean": 9.0, "beta_std": 0.5},
             {"step": 20, "split": "train", "beta_mean": 2.0, "beta_std": 0.25},  # resumed: the last record wins
             {"step": 20, "split": "eval", "R@1": 1.0}]
    learned = [_write_run(str(tmp_path), "learned", s, betas=queries, train=train) for s in range(3)]
    hist = caam.beta_histogram(learned, meta, bins=4)
    assert hist["count"] == 6 and sum(hist["histogram"]["counts"]) == 6
    assert hist["by_context"]["keep"]["count"] == 3 and hist["by_context"]["change"]["count"] == 3
    assert hist["by_context"]["change"]["mean"] == pytest.approx(4.0)  # a vector beta counts as its mean
    assert hist["area_pearson_r"] == pytest.approx(1.0)
    per_seed = hist["histogram"]["per_seed"]  # each seed: one query in the first bin (1.0), one in the last (4.0)
    assert per_seed["all"]["mean"] == pytest.approx([1, 0, 0, 1]) and per_seed["all"]["std"] == pytest.approx([0] * 4)
    assert per_seed["keep"]["mean"] == pytest.approx([1, 0, 0, 0])
    assert per_seed["change"]["mean"] == pytest.approx([0, 0, 0, 1])
    assert caam.context_change(None, "r1", "t1") is None
    curve = caam.beta_over_training(learned)
    assert curve["steps"] == [10, 20]
    assert curve["over_seeds"]["beta_mean"]["mean"] == pytest.approx([1.0, 2.0])
    assert curve["over_seeds"]["beta_std"]["std"] == pytest.approx([0.0, 0.0])


def test_perturbation_table_repeats_the_baseline_that_never_reads_the_box(tmp_path):
    groups = {"learned": [_write_run(str(tmp_path), "learned", 0, {"x/R@1": 30.0, "x/R_ID@1": 60.0})],
              "baseline": [_write_run(str(tmp_path), "baseline", s, {"x/R@1": 10.0 + s, "x/R_ID@1": 40.0})
                           for s in range(2)]}
    table = caam.perturbation_table(groups, ["learned"], kinds=["no_box"])
    base = [r for r in table["rows"] if r["model"] == "baseline"]
    assert [r["perturbation"] for r in base] == ["none", "no_box"]
    assert all(r["box_unused"] and r["R@1"]["values"] == [10.0, 11.0] for r in base)


def _write_rankings(run, records):
    with open(os.path.join(run.workdir, "eval", "rankings.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_context_table_scores_keep_and_change_queries_by_hand(tmp_path, monkeypatch):
    # Instance a in contexts x (two shots) and y, instance b in x. Query 0 keeps context x, query 1 changes to y.
    meta = {"images": {"a-x": {"instance": "a", "context": "x"}, "a-x-2": {"instance": "a", "context": "x"},
                       "a-y": {"instance": "a", "context": "y"}, "b-x": {"instance": "b", "context": "x"}}}
    keep = {"query_id": "d/0", "reference": "a-x", "target": "a-x-2"}
    change = {"query_id": "d/1", "reference": "a-x", "target": "a-y"}
    tops = {  # (seed 0, seed 1) first results: exact target, same instance elsewhere, another instance
        "learned": (("a-x-2", "a-y"), ("a-y", "a-y")),
        "beta5": (("a-y", "a-y"), ("b-x", "a-x-2")),
    }
    groups = {}
    for name, per_seed in tops.items():
        groups[name] = []
        for s, (k_top, c_top) in enumerate(per_seed):
            run = _write_run(str(tmp_path), name, s, {"d/R@1": 0.0, "d/R_ID@1": 0.0})
            _write_rankings(run, [{**keep, "ranking": [k_top, "b-x"]}, {**change, "ranking": [c_top, "b-x"]},
                                  {"query_id": "d/2", "reference": "zz", "target": "a-y", "ranking": ["a-y"]}])
            groups[name].append(run)
    monkeypatch.setattr(study, "saved_config", lambda w: _saved(w.split(os.sep)[-2], int(w[-1]), 5.0))
    table = caam.context_table(groups, meta)
    rows = {r["name"]: r for r in table["rows"]}
    assert [r["name"] for r in table["rows"]] == ["learned", "beta5"] and rows["beta5"]["beta"] == 5.0
    assert rows["learned"]["keep"]["count"] == rows["learned"]["change"]["count"] == 1  # "zz" has no metadata
    assert rows["learned"]["keep"]["R@1"]["values"] == [100.0, 0.0]
    assert rows["learned"]["keep"]["R_ID@1"]["values"] == [100.0, 100.0]
    assert rows["learned"]["change"]["R@1"]["values"] == [100.0, 100.0]
    assert rows["beta5"]["keep"]["R@1"]["values"] == [0.0, 0.0]
    assert rows["beta5"]["keep"]["R_ID@1"]["values"] == [100.0, 0.0]
    assert rows["beta5"]["change"]["R@1"]["values"] == [100.0, 0.0]
    assert rows["beta5"]["change"]["R_ID@1"]["values"] == [100.0, 100.0]
    assert caam.context_table(groups, None)["rows"] == []
    # A first result the metadata does not know (another build's image) is a miss, not a crash.
    _write_rankings(groups["beta5"][0], [{**keep, "ranking": ["elsewhere"]}, {**change, "ranking": ["a-y"]}])
    again = {r["name"]: r for r in caam.context_table(groups, meta)["rows"]}
    assert again["beta5"]["keep"]["R_ID@1"]["values"] == [0.0, 0.0]
    # Only one fixed beta here: the oracle takes it for both kinds, weighted by the query counts (1 and 1).
    assert table["oracle"]["keep_beta"] == table["oracle"]["change_beta"] == 5.0
    assert table["oracle"]["R@1"]["values"] == [50.0, 0.0]


def test_curves_command_plots_labelled_workdirs(tmp_path, capsys):
    train = [{"step": 10, "split": "train", "beta_mean": 0.5, "beta_std": 0.1},
             {"step": 20, "split": "train", "beta_mean": 3.0, "beta_std": 0.2}]
    a = _write_run(str(tmp_path), "learned", 0, train=train)
    b = _write_run(str(tmp_path), "learned", 1, train=train[:1])
    out = tmp_path / "cmp" / "curves.png"
    assert cli.main(["curves", f"recipe A={a.workdir}", f"lr=1e-4={b.workdir}", "--out", str(out)]) == 0
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    curves = json.loads((tmp_path / "cmp" / "curves.json").read_text())["curves"]
    assert [p["beta_mean"] for p in curves["recipe A"]] == [0.5, 3.0] and len(curves["lr=1e-4"]) == 1
    with pytest.raises(SystemExit):
        cli.main(["curves", "no-label-here", "--out", str(out)])
