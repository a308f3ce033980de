"""The README's demo table from seed runs: ``python -m idmr_jax.tasks.oacir.demo_table RUNS_DIR``.

`RUNS_DIR` holds one workdir per run, named ``<model>-seed<N>`` (``scripts/demo_seeds.sh`` writes them, with the
run's wall time in ``wall_s``); each row of the Markdown table is one model: mean ± sample standard deviation
(ddof=1) over its seeds of the demo metrics in ``eval/metrics.json``, and of the wall time.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

METRICS = ("demo/R_ID@1", "demo/R@1", "demo/R@5", "demo/R@10", "avg")
MODELS = {"adafocal": "AdaFocal (`bash scripts/demo.sh`)",
          "baseline": "standard CIR baseline (`IDMR_DEMO_CONFIG=configs/oacir.py:demo,baseline bash scripts/demo.sh`)"}
RUN_NAME = re.compile(r"^(?P<model>[\w.-]+)-seed(?P<seed>\d+)$")


def collect(runs_dir: str | Path) -> dict[str, dict[int, dict]]:
    """{model: {seed: metrics (plus ``wall_s`` when recorded)}} of the finished runs in `runs_dir`."""
    out: dict[str, dict[int, dict]] = {}
    for wd in sorted(Path(runs_dir).iterdir()):
        match, metrics = RUN_NAME.match(wd.name), wd / "eval" / "metrics.json"
        if not match or not metrics.exists():
            continue
        row = json.loads(metrics.read_text())
        if (wd / "wall_s").exists():
            row["wall_s"] = float((wd / "wall_s").read_text())
        out.setdefault(match["model"], {})[int(match["seed"])] = row
    return out


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std over the seeds; a single value has none)."""
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def minutes(seconds: list[float]) -> str:
    m = float(np.mean(seconds)) / 60
    return f"{m:.1f} min" + (f" ± {float(np.std(seconds, ddof=1)) / 60:.1f}" if len(seconds) > 1 else "")


def markdown_table(runs: dict[str, dict[int, dict]]) -> str:
    """The table: one row per model, mean ± std over its seeds."""
    head = [f"demo (val, 134 queries; {'/'.join(str(len(s)) for s in runs.values())} seeds)",
            *(m.split("/")[-1] for m in METRICS), "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, seeds in runs.items():
        rows = list(seeds.values())
        cells = [mean_std([r[m] for r in rows]) for m in METRICS]
        walls = [r["wall_s"] for r in rows if "wall_s" in r]
        lines.append("| " + " | ".join([MODELS.get(model, model), *cells, minutes(walls) if walls else "-"]) + " |")
    per_seed = "; ".join(f"{model} R_ID@1 by seed: " + ", ".join(f"{s}: {v[s]['demo/R_ID@1']:.2f}" for s in sorted(v))
                         for model, v in runs.items())
    return "\n".join(lines) + "\n\n" + per_seed


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m idmr_jax.tasks.oacir.demo_table RUNS_DIR (got {argv[1:]})")
    runs = collect(argv[1])
    if not runs:
        raise SystemExit(f"no finished run (<model>-seed<N>/eval/metrics.json) in {argv[1]}")
    print(markdown_table(runs))


if __name__ == "__main__":
    main(sys.argv)
