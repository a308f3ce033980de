r"""``python -m idmr_jax.analysis caam --config=configs/oacir.py:demo --seeds=3 --workdir=W``: AdaFocal's beta
studies (paper Fig. 5, the learned-beta distribution, Table 10, beta over training) with seeds.

    --betas 0,1,2,5,10,20       the fixed betas of the sweep (default)
    --perturb learned           the models evaluated under box perturbation (iou0.8, iou0.5, no_box); the
                                baseline never reads the box, its table rows repeat its own evaluation
    --models learned,beta5      train / evaluate only these runs (default: all); the analyses read every finished run
    --dry-run                   print the runs and evaluations it would do (finished ones are reused), then stop
    --no-plots                  the JSON tables only

``python -m idmr_jax.analysis curves LABEL=WORKDIR ... --out FILE.png`` draws beta over training of any training
workdirs in one plot (e.g. one recipe against another), with the curves as JSON beside it.

Runs go to ``W/runs/<name>/seed<k>`` (`idmr_jax.analysis.runs`), the tables and PNGs to ``W/analysis/``
(`idmr_jax.analysis.caam`, `idmr_jax.analysis.plots`). Rerunning reuses every finished run and evaluation.
The runs share one persistent XLA compilation cache, ``W/xla_cache`` (``JAX_COMPILATION_CACHE_DIR`` when set;
`idmr_jax.runtime.enable_compilation_cache`): the seeds of a model differ in values only, so only the first
compiles its programs.
"""

from __future__ import annotations

import argparse
import os
import sys


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per study (``caam``)."""
    p = argparse.ArgumentParser(prog="python -m idmr_jax.analysis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)
    c = sub.add_parser("caam", help="AdaFocal's beta studies over seeds")
    c.add_argument("--config", required=True, help="the CAAM config, e.g. configs/oacir.py:demo")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 of every run (config.seed)")
    c.add_argument("--workdir", required=True, help="the study folder (runs/ and analysis/ inside)")
    c.add_argument("--betas", type=_floats, default=[0, 1, 2, 5, 10, 20], help="fixed betas, comma-separated")
    c.add_argument("--perturb", type=_names, default=["learned"],
                   help="models evaluated under box perturbation, comma-separated run names")
    c.add_argument("--models", type=_names, default=None,
                   help="run names to train and evaluate (learned, baseline, beta<X>), comma-separated; default all")
    c.add_argument("--dry-run", action="store_true", help="print what would run, do nothing")
    c.add_argument("--no-plots", action="store_true", help="write the JSON tables without the PNGs")
    k = sub.add_parser("curves", help="beta over training of several training workdirs in one plot")
    k.add_argument("runs", nargs="+", type=_labelled,
                   help="LABEL=WORKDIR (split at the last '='), one per line of the plot")
    k.add_argument("--out", required=True, help="the PNG to write (its JSON goes beside it)")
    return p


def _labelled(text: str) -> tuple[str, str]:
    label, sep, workdir = text.rpartition("=")  # at the last "=": a label may hold one (caam_lr=1e-4)
    if not sep or not label or not workdir:
        raise argparse.ArgumentTypeError(f"expected LABEL=WORKDIR, got {text!r}")
    return label, workdir


def main(argv: list[str] | None = None) -> int:
    """Runs the chosen study; returns the exit status."""
    args = parser().parse_args(argv)
    if args.study == "curves":
        from idmr_jax.analysis import caam

        print("wrote:\n" + "\n".join(f"  {p}" for p in caam.compare_curves(args.runs, args.out).values()))
        return 0
    from idmr_jax import runtime

    runtime.enable_compilation_cache(os.path.join(os.path.abspath(args.workdir), "xla_cache"))
    from idmr_jax.analysis import caam

    written = caam.run_study(args.config, args.seeds, args.betas, args.workdir, dry_run=args.dry_run,
                             perturbed=args.perturb, models=args.models, plots=not args.no_plots)
    if written:
        print("\n".join(caam.summary_lines(args.workdir + "/analysis")))
        print("wrote:\n" + "\n".join(f"  {p}" for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
