"""The CAAM studies (AdaFocal's beta analyses) from finished runs: JSON tables, then the plots.

Inputs are the study's run folders (`idmr_jax.analysis.runs`); every number is read from what the runs wrote:

- ``eval/metrics.json`` (R_ID@1 and R@1, averaged over the subsets it holds) for the fixed-beta sweep
  (paper Fig. 5) and, with ``perturb/<kind>/eval/metrics.json``, the box-perturbation table (paper Table 10);
- ``eval/betas.jsonl`` (`idmr_jax.tasks.oacir.evaluate`) for the learned-beta distribution over the val queries;
- ``metrics.jsonl`` (``beta_mean``, ``beta_std`` of each logged train step) for beta over training;
- ``eval/rankings.jsonl`` (each query's top gallery images, reference and target) for R@1 and R_ID@1 over the
  queries that keep the reference's context and over those that change it (the context demo benchmark).

Each point of the sweep is placed by the run's *saved* config (seed, beta mode, fixed beta; `runs.check_saved`),
not by its folder name alone. Spreads are over seeds: the mean and the sample standard deviation (ddof 1; 0 for
a single seed), with the per-seed values alongside.

Context keep/change of a query comes from the demo benchmark's own metadata (``demo_meta.json``, which records
each image's context): the modification text describes the target, so it keeps the reference's context exactly
when the target image sits in the reference image's context. Outside the demo it is null.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from idmr_jax.analysis import runs as study

METRICS = ("R_ID@1", "R@1")
HIST_BINS = 20


def summarize(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}`` over seeds; std is the sample standard deviation (0 for one value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "values": v.tolist()}


def read_metrics(path: str) -> dict[str, float]:
    """R_ID@1 and R@1 of one ``metrics.json``: each the mean over the subsets (``"<subset>/<metric>"`` keys)."""
    with open(path) as f:
        flat = json.load(f)
    out = {}
    for metric in METRICS:
        vals = [v for k, v in flat.items() if k.rpartition("/")[2] == metric]
        if not vals:
            raise KeyError(f"{path}: no '<subset>/{metric}' entry")
        out[metric] = float(np.mean(vals))
    return out


def by_model(runs: Sequence[study.Run]) -> dict[str, list[study.Run]]:
    """The finished runs grouped by name, in plan order; raises if a run's saved config does not match it."""
    groups: dict[str, list[study.Run]] = {}
    for run in runs:
        if not run.finished:
            continue
        study.check_saved(run, study.saved_config(run.workdir))
        groups.setdefault(run.name, []).append(run)
    return groups


def _model_entry(group: Sequence[study.Run]) -> dict:
    per_seed = [read_metrics(r.metrics_path) for r in group]
    return {"seeds": [r.seed for r in group], **{m: summarize([p[m] for p in per_seed]) for m in METRICS}}


def fixed_beta_sweep(groups: dict[str, list[study.Run]], zero_from_baseline: bool = True) -> dict:
    """R_ID@1 and R@1 against the fixed beta (from each run's saved config), with learned CAAM and the baseline.

    With `zero_from_baseline` the point at beta = 0 is the baseline's runs (the same model bit for bit; see
    `idmr_jax.analysis.runs`), marked ``"name": "baseline"``."""
    points = []
    if zero_from_baseline and study.BASELINE in groups and study.beta_name(0) not in groups:
        points.append({"beta": 0.0, "name": study.BASELINE, **_model_entry(groups[study.BASELINE])})
    for name, group in groups.items():
        if name in (study.LEARNED, study.BASELINE):
            continue
        beta = float(study.saved_config(group[0].workdir).model.fixed_beta)
        points.append({"beta": beta, "name": name, **_model_entry(group)})
    points.sort(key=lambda p: p["beta"])
    return {"metrics": list(METRICS), "points": points,
            **{k: _model_entry(groups[k]) if k in groups else None for k in (study.LEARNED, study.BASELINE)}}


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def context_change(meta: dict | None, reference: str, target: str) -> str | None:
    """"keep" if the target image shows the reference image's context, "change" if not; None without metadata."""
    images = (meta or {}).get("images", {})
    if reference not in images or target not in images:
        return None
    return "keep" if images[reference]["context"] == images[target]["context"] else "change"


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def beta_histogram(learned: Sequence[study.Run], meta: dict | None, bins: int = HIST_BINS) -> dict:
    """The learned beta of every val query of every learned run (each query once per seed): the histogram, and
    beta against the box's area fraction and against context keep/change. A vector beta counts as its mean.
    ``histogram.per_seed`` counts each seed's queries in the same bins: mean and std over seeds per bin, for all
    queries and for those that keep / change the context."""
    queries = []
    for run in learned:
        for rec in read_jsonl(os.path.join(run.workdir, "eval", "betas.jsonl")):
            beta = rec["beta"]
            queries.append({"seed": run.seed, "query_id": rec["query_id"], "subset": rec["subset"],
                            "beta": float(np.mean(beta)), "box_area_fraction": rec.get("box_area_fraction"),
                            "context": context_change(meta, rec.get("reference", ""), rec.get("target", ""))})
    betas = np.array([q["beta"] for q in queries], np.float64)
    counts, edges = np.histogram(betas, bins=bins) if len(betas) else (np.zeros(0, int), np.zeros(0))
    # The same bins, counted per seed: the plot's error bars (for all queries, and per context label when any).
    per_seed = {"all": {"mean": [], "std": []}}
    for label in ("all", "keep", "change") if len(betas) else ():
        seed_counts = np.array([np.histogram([q["beta"] for q in queries if q["seed"] == r.seed
                                              and label in ("all", q["context"])], bins=edges)[0] for r in learned])
        if label == "all" or seed_counts.any():
            std = seed_counts.std(axis=0, ddof=1) if len(seed_counts) > 1 else np.zeros(len(edges) - 1)
            per_seed[label] = {"mean": seed_counts.mean(axis=0).tolist(), "std": std.tolist()}
    with_area = [q for q in queries if q["box_area_fraction"] is not None]
    by_context = {}
    for label in ("keep", "change"):
        by_context[label] = summarize([q["beta"] for q in queries if q["context"] == label])
        by_context[label]["count"] = len(by_context[label]["values"])
        del by_context[label]["values"]  # the per-query values are in "queries"
    return {"seeds": [r.seed for r in learned], "count": len(queries),
            "beta_mean": float(betas.mean()) if len(betas) else None,
            "beta_std": float(betas.std()) if len(betas) else None,
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist(), "per_seed": per_seed},
            "area_pearson_r": _pearson(np.array([q["box_area_fraction"] for q in with_area]),
                                       np.array([q["beta"] for q in with_area])),
            "by_context": by_context, "queries": queries}


def _record_hits(rec: dict, images: dict) -> tuple[float, float]:
    """(R@1, R_ID@1) of one ranking record, as 0 or 100: its first gallery image is the target / shows the
    target's instance (the reference is already removed from ``ranking``)."""
    top = rec["ranking"][0] if rec["ranking"] else None
    hit = top == rec["target"]
    same = top is not None and images.get(top, {}).get("instance") == images[rec["target"]]["instance"]
    return 100.0 * hit, 100.0 * same


def context_table(groups: dict[str, list[study.Run]], meta: dict | None) -> dict:
    """R@1 and R_ID@1 of every model over the queries whose text keeps the reference's context and over those that
    change it, mean +- std over seeds, scored from each run's ``eval/rankings.jsonl`` (which names every query's
    reference and target). Empty ``rows`` without demo metadata or when no query keeps its context."""
    images = (meta or {}).get("images", {})
    rows = []
    for name, group in groups.items():
        per_label: dict[str, list[dict[str, float]]] = {"keep": [], "change": []}
        counts = {"keep": 0, "change": 0}
        for run in group:
            hits: dict[str, list[tuple[float, float]]] = {"keep": [], "change": []}
            for rec in read_jsonl(os.path.join(run.workdir, "eval", "rankings.jsonl")):
                label = context_change(meta, rec.get("reference", ""), rec.get("target", ""))
                if label is not None:
                    hits[label].append(_record_hits(rec, images))
            for label, h in hits.items():
                if h:
                    per_label[label].append({"R@1": float(np.mean([x for x, _ in h])),
                                             "R_ID@1": float(np.mean([y for _, y in h]))})
                    counts[label] = len(h)
        if not per_label["keep"]:
            continue
        saved = study.saved_config(group[0].workdir).model
        beta = None if name == study.LEARNED else float(saved.fixed_beta) if name != study.BASELINE else 0.0
        rows.append({"name": name, "beta": beta, "seeds": [r.seed for r in group],
                     **{label: {"count": counts[label], **{m: summarize([v[m] for v in per_label[label]])
                                                           for m in METRICS}} for label in per_label}})
    rows.sort(key=lambda r: (r["beta"] is not None, r["beta"] or 0.0))
    return {"metrics": list(METRICS), "labels": ["keep", "change"], "rows": rows, "oracle": _context_oracle(rows)}


def _context_oracle(rows: list[dict]) -> dict | None:
    """What reading keep/change perfectly could reach among the fixed betas: the keep queries at the fixed beta best
    for them (mean R@1 over seeds), the change queries at theirs, combined per seed (weighted by query counts)."""
    fixed = [r for r in rows if r["beta"] is not None and len(r["seeds"]) == len(rows[0]["seeds"])]
    if not fixed:
        return None
    best = {label: max(fixed, key=lambda r: r[label]["R@1"]["mean"]) for label in ("keep", "change")}
    n = {label: best[label][label]["count"] for label in best}
    out = {f"{label}_beta": best[label]["beta"] for label in best}
    for metric in METRICS:
        per_seed = [(n["keep"] * k + n["change"] * c) / (n["keep"] + n["change"])
                    for k, c in zip(best["keep"]["keep"][metric]["values"], best["change"]["change"][metric]["values"])]
        out[metric] = summarize(per_seed)
    return out


def perturbation_table(groups: dict[str, list[study.Run]], models: Sequence[str],
                       kinds: Sequence[str] = study.PERTURBATIONS) -> dict:
    """One row per (model, perturbation): R_ID@1 and R@1 over seeds; "none" is the run's own evaluation.

    The baseline never reads the box (beta = 0), so a perturbed box cannot change it: when it is not among
    `models`, its rows repeat its own evaluation, marked ``"box_unused": true``, instead of evaluating it again."""
    rows = []
    for name in models:
        for kind in ("none", *kinds):
            paths = [(r, r.metrics_path if kind == "none" else
                      os.path.join(r.perturb_workdir(kind), "eval", "metrics.json")) for r in groups.get(name, [])]
            found = [(r, read_metrics(p)) for r, p in paths if os.path.exists(p)]
            rows.append({"model": name, "perturbation": kind, "seeds": [r.seed for r, _ in found],
                         **{m: summarize([v[m] for _, v in found]) for m in METRICS}})
    if study.BASELINE in groups and study.BASELINE not in models:
        own = [(r, read_metrics(r.metrics_path)) for r in groups[study.BASELINE]]
        rows += [{"model": study.BASELINE, "perturbation": kind, "seeds": [r.seed for r, _ in own],
                  "box_unused": True, **{m: summarize([v[m] for _, v in own]) for m in METRICS}}
                 for kind in ("none", *kinds)]
    return {"metrics": list(METRICS), "perturbations": ["none", *kinds], "rows": rows}


def train_betas(run: study.Run | str) -> list[dict]:
    """``{"step", "beta_mean", "beta_std"}`` per logged train step of a run or a training workdir (the last record
    of a step wins: a resumed run appends to ``metrics.jsonl``)."""
    steps = {}
    workdir = run if isinstance(run, str) else run.workdir
    for rec in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if rec.get("split", "train") == "train" and "beta_mean" in rec:
            steps[int(rec["step"])] = {"step": int(rec["step"]), "beta_mean": float(rec["beta_mean"]),
                                       "beta_std": float(rec.get("beta_std", float("nan")))}
    return [steps[s] for s in sorted(steps)]


def beta_over_training(learned: Sequence[study.Run]) -> dict:
    """Per learned run, beta_mean and beta_std against the step; plus their mean over seeds at each step all logged."""
    per_seed = {str(r.seed): train_betas(r) for r in learned}
    common = sorted(set.intersection(*[{p["step"] for p in v} for v in per_seed.values()])) if per_seed else []
    over_seeds = {}
    for key in ("beta_mean", "beta_std"):
        at = [[next(p[key] for p in v if p["step"] == s) for v in per_seed.values()] for s in common]
        over_seeds[key] = {"mean": [float(np.mean(a)) for a in at],
                           "std": [summarize(a)["std"] for a in at]}
    return {"steps": common, "over_seeds": over_seeds, "per_seed": per_seed}


def demo_meta(config) -> dict | None:
    """The demo benchmark's ``demo_meta.json`` for a demo config (None for other sources or if not built yet)."""
    if config.data.source != "demo":
        return None
    from idmr_jax.data.demo_bench import builder
    from idmr_jax.tasks.oacir import demo

    path = os.path.join(demo.benchmark_dir(config), builder.META)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> str:
    """Writes `obj` as indented JSON (NaN-free: missing values are null) and returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def analyse(runs: Sequence[study.Run], out_dir: str, *, meta: dict | None, perturbed: Sequence[str],
            kinds: Sequence[str] = study.PERTURBATIONS, plots: bool = True) -> dict[str, str]:
    """Writes every analysis of the finished `runs` under `out_dir` (``W/analysis``) -> {name: path}."""
    groups = by_model(runs)
    learned = groups.get(study.LEARNED, [])
    tables = {"fixed_beta": fixed_beta_sweep(groups), "beta_histogram": beta_histogram(learned, meta),
              "box_perturbation": perturbation_table(groups, perturbed, kinds),
              "beta_over_training": beta_over_training(learned), "by_context": context_table(groups, meta)}
    written = {name: write_json(os.path.join(out_dir, f"{name}.json"), _finite(t)) for name, t in tables.items()}
    if plots:
        from idmr_jax.analysis import plots as plotting

        for name, draw in (("fixed_beta", plotting.fixed_beta), ("beta_histogram", plotting.beta_histogram),
                           ("beta_over_training", plotting.beta_over_training), ("by_context", plotting.by_context)):
            if name != "by_context" or tables[name]["rows"]:
                written[f"{name}.png"] = draw(tables[name], os.path.join(out_dir, f"{name}.png"))
    return written


def _finite(obj):
    """NaN and inf -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_study(config_spec: str, seeds: int, betas: Sequence[float], workdir: str, *, dry_run: bool = False,
              perturbed: Sequence[str] = (study.LEARNED,), kinds: Sequence[str] = study.PERTURBATIONS,
              models: Sequence[str] | None = None, runner: study.Runner | None = None, plots: bool = True,
              log=print) -> dict[str, str]:
    """The whole study: train what is missing, evaluate the perturbations, write ``W/analysis/`` -> its files.

    `dry_run` only prints what would run (and writes nothing). `models`: run names to run (default all; the
    analyses still read every finished run of the plan). `runner`: the trainer in-process (default
    `runs.default_runner`, as ``idmr_jax.main`` runs one config)."""
    plan = study.plan_runs(config_spec, seeds, betas, workdir)
    if models is not None:
        missing = set(models) - {r.name for r in plan}
        if missing:
            raise ValueError(f"models {sorted(missing)} are not runs of this study")
        plan_to_run = [r for r in plan if r.name in models]
    else:
        plan_to_run = plan
    unknown = set(perturbed) - {r.name for r in plan}
    if unknown:
        raise ValueError(f"perturbation models {sorted(unknown)} are not runs of this study")
    if dry_run:
        for line in study.describe(plan_to_run, config_spec, kinds, perturbed):
            log(line)
        return {}
    runner = runner or study.default_runner()
    study.train_missing(plan_to_run, config_spec, runner, log=log)
    finished = [r for r in plan_to_run if r.name in perturbed and r.finished]
    study.perturbation_evals(finished, config_spec, kinds, runner, log=log)
    _, arg = study.split_config(config_spec)
    meta = demo_meta(study.load_config(config_spec, arg, 0))
    return analyse(plan, os.path.join(workdir, "analysis"), meta=meta, perturbed=perturbed, kinds=kinds, plots=plots)


def summary_lines(out_dir: str) -> list[str]:
    """A short text summary of the written tables (what the CLI prints at the end)."""
    with open(os.path.join(out_dir, "fixed_beta.json")) as f:
        sweep = json.load(f)
    lines = ["model        " + "  ".join(f"{m:>15s}" for m in sweep["metrics"])]

    def row(label, entry):
        cells = [f"{entry[m]['mean']:7.2f} ± {entry[m]['std']:5.2f}" if entry and entry[m]["mean"] is not None
                 else f"{'-':>15s}" for m in sweep["metrics"]]
        lines.append(f"{label:12s} " + "  ".join(cells))

    row("learned", sweep["learned"])
    row("baseline", sweep["baseline"])
    for p in sweep["points"]:
        row(f"beta={p['beta']:g}", p)
    with open(os.path.join(out_dir, "by_context.json")) as f:
        ctx = json.load(f)
    for r in ctx["rows"]:
        label = "learned" if r["beta"] is None else f"beta={r['beta']:g}"
        lines.append(f"{label:12s} R@1 keep {r['keep']['R@1']['mean']:6.2f} ± {r['keep']['R@1']['std']:5.2f}  "
                     f"change {r['change']['R@1']['mean']:6.2f} ± {r['change']['R@1']['std']:5.2f}")
    if ctx.get("oracle"):
        o = ctx["oracle"]
        lines.append(f"keep at beta={o['keep_beta']:g}, change at beta={o['change_beta']:g}: "
                     f"R@1 {o['R@1']['mean']:.2f} ± {o['R@1']['std']:.2f}")
    with open(os.path.join(out_dir, "beta_histogram.json")) as f:
        hist = json.load(f)
    if hist["count"]:
        lines.append(f"learned beta over {hist['count']} query-seeds: mean {hist['beta_mean']:.3f}, "
                     f"std {hist['beta_std']:.3f}")
    return lines


def compare_curves(labelled: Sequence[tuple[str, str]], out_png: str) -> dict[str, str]:
    """Beta over training of several training workdirs in one plot (e.g. a recipe against another), each line
    labelled: writes ``out_png`` and the curves as JSON beside it -> {"json", "png"}."""
    curves = {label: train_betas(workdir) for label, workdir in labelled}
    out_json = os.path.splitext(out_png)[0] + ".json"
    write_json(out_json, _finite({"curves": curves, "workdirs": dict(labelled)}))
    from idmr_jax.analysis import plots as plotting

    return {"json": out_json, "png": plotting.beta_over_training({"per_seed": curves}, out_png,
                                                                 title="beta over training")}
