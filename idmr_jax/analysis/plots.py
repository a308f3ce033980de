"""PNG plots of the CAAM analyses, drawn from the JSON tables of `idmr_jax.analysis.caam`.

matplotlib is imported here only, inside the functions, with the Agg backend (no display; importing the package
stays cheap for everything that does not plot).
"""

from __future__ import annotations

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _band(ax, entry: dict | None, metric: str, label: str, color: str) -> None:
    """A horizontal line at the mean with a shaded band of +- one std (skipped when there is no entry)."""
    if not entry or entry[metric]["mean"] is None:
        return
    mean, std = entry[metric]["mean"], entry[metric]["std"]
    ax.axhline(mean, color=color, lw=1.5, label=f"{label} ({mean:.1f} ± {std:.1f})")
    ax.axhspan(mean - std, mean + std, color=color, alpha=0.15)


def fixed_beta(table: dict, path: str) -> str:
    """R_ID@1 and R@1 against the fixed beta (mean +- std over seeds, seeds as dots), learned CAAM and the
    baseline as bands (paper Fig. 5)."""
    plt = _pyplot()
    metrics = table["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4))
    points = table["points"]
    xs = list(range(len(points)))  # evenly spaced: the betas span 0..20 with most of them small
    for ax, metric in zip(axes, metrics):
        means = [p[metric]["mean"] for p in points]
        stds = [p[metric]["std"] for p in points]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, color="tab:blue", label="fixed beta")
        for x, p in zip(xs, points):
            ax.scatter([x] * len(p[metric]["values"]), p[metric]["values"], s=10, color="tab:blue", alpha=0.4)
        _band(ax, table.get("learned"), metric, "learned CAAM", "tab:red")
        _band(ax, table.get("baseline"), metric, "baseline (no CAAM)", "tab:gray")
        ax.set_xticks(xs, [f"{p['beta']:g}" for p in points])
        ax.set_xlabel("fixed beta")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len((table.get("learned") or {}).get("seeds", [])) or max((len(p["seeds"]) for p in points), default=0)
    fig.suptitle(f"Fixed beta against learned CAAM ({seeds} seed{'s' if seeds != 1 else ''}, mean ± std)")
    return _save(fig, path)


def beta_histogram(table: dict, path: str) -> str:
    """Three panels: the histogram of learned betas, beta against the box's area fraction, beta by whether the
    text keeps or changes the reference's context."""
    plt = _pyplot()
    fig, (h_ax, a_ax, c_ax) = plt.subplots(1, 3, figsize=(15, 4))
    hist = table["histogram"]
    edges = hist["edges"]
    per_seed = hist.get("per_seed", {})
    labels = [k for k in ("keep", "change") if k in per_seed] or ["all"]
    for label, color in zip(labels, ("tab:blue", "tab:orange")):
        mean, std = per_seed.get(label, {}).get("mean", []), per_seed.get(label, {}).get("std", [])
        if not mean:
            continue
        centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:])]
        width = (edges[1] - edges[0]) / len(labels)
        shift = [(i - (len(labels) - 1) / 2) * width for i in range(len(labels))][labels.index(label)]
        h_ax.bar([c + shift for c in centres], mean, width=width, yerr=std, capsize=2, alpha=0.7, color=color,
                 label=f"text {label}s the context" if label != "all" else None)
    if len(labels) > 1:
        h_ax.legend(fontsize=8)
    h_ax.locator_params(axis="x", nbins=5)  # long labels (e.g. 14.875) overlap at matplotlib's default count
    h_ax.set_xlabel("learned beta")
    h_ax.set_ylabel("queries per seed (mean ± std over seeds)")
    h_ax.set_title(f"{table['count']} query-seeds, seeds {table['seeds']}")
    queries = table["queries"]
    area = [(q["box_area_fraction"], q["beta"]) for q in queries if q["box_area_fraction"] is not None]
    if area:
        a_ax.scatter(*zip(*area), s=12, alpha=0.6)
    r = table.get("area_pearson_r")
    a_ax.set_title("beta vs box area" + (f" (Pearson r {r:.2f})" if r is not None else ""))
    a_ax.set_xlabel("box area / image area")
    a_ax.set_ylabel("learned beta")
    groups = [(label, [q["beta"] for q in queries if q["context"] == label]) for label in ("keep", "change")]
    groups = [(label, v) for label, v in groups if v]
    if groups:
        c_ax.boxplot([v for _, v in groups], tick_labels=[f"{label} (n={len(v)})" for label, v in groups])
    else:
        c_ax.text(0.5, 0.5, "no keep/change metadata", ha="center", va="center", transform=c_ax.transAxes)
    c_ax.set_title("beta vs the text's context")
    c_ax.set_ylabel("learned beta")
    for ax in (h_ax, a_ax, c_ax):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def beta_over_training(table: dict, path: str, title: str = "learned beta over training") -> str:
    """beta_mean (with +- beta_std over the batch's queries) per step, one line per seed (or per label of
    ``table["per_seed"]`` that is not a seed number)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for seed, pts in table["per_seed"].items():
        if not pts:
            continue
        steps = [p["step"] for p in pts]
        mean = [p["beta_mean"] for p in pts]
        std = [p["beta_std"] if p["beta_std"] is not None else 0.0 for p in pts]
        line, = ax.plot(steps, mean, marker=".", label=f"seed {seed}" if str(seed).isdigit() else seed)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("beta (batch mean ± batch std)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if table["per_seed"]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def by_context(table: dict, path: str) -> str:
    """R@1 and R_ID@1 against the fixed beta, separately over the queries that keep the reference's context and
    those that change it (mean +- std over seeds), with learned CAAM as bands in the same colours."""
    plt = _pyplot()
    metrics = table["metrics"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4))
    fixed = [r for r in table["rows"] if r["beta"] is not None]
    learned = next((r for r in table["rows"] if r["name"] == "learned"), None)
    xs = list(range(len(fixed)))
    for ax, metric in zip(axes, metrics):
        for label, color in zip(table["labels"], ("tab:blue", "tab:orange")):
            n = fixed[0][label]["count"] if fixed else 0
            ax.errorbar(xs, [r[label][metric]["mean"] for r in fixed], yerr=[r[label][metric]["std"] for r in fixed],
                        marker="o", capsize=4, color=color, label=f"fixed beta, text {label}s context (n={n})")
            if learned:
                _band(ax, learned[label], metric, f"learned CAAM, {label}", color)
        ax.set_xticks(xs, [f"{r['beta']:g}" for r in fixed])
        ax.set_xlabel("fixed beta (0 = baseline)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Queries that keep the reference's context against those that change it")
    return _save(fig, path)
