"""The runs of a CAAM study: which configs at which seeds, where each lives, and training or reusing them.

A study over ``--config=configs/oacir.py:ARG`` trains, at seeds 0..S-1 (``config.seed``):

    learned     ``ARG``                    CAAM (the config as given)
    baseline    ``ARG,baseline``           no CAAM, beta = 0 (the standard CIR baseline)
    beta<X>     ``ARG,fixed_beta=X``       a fixed, hand-set beta, for each X of ``--betas``

each in ``W/runs/<name>/seed<k>`` (an ordinary training workdir). A seed is the model's initialisation and dropout
(``config.seed``) and the training order (``config.data.shuffle_seed``), as in ``scripts/demo_seeds.sh``; the
benchmark stays the same. beta = 0 is not trained as a fixed beta: the baseline is that model (no bias at all
equals a zero bias bit for bit, `tests/test_adafocal.py`), so the sweep's point at 0 is the baseline's runs.

A run whose ``eval/metrics.json`` exists is finished and never retrained, so a study that was interrupted, or rerun
with more betas, only trains what is missing. Box-perturbation evaluations of a finished run go to
``W/runs/<name>/seed<k>/perturb/<kind>/`` (its own eval folder; the run's ``eval/`` is never touched), reading the
run's checkpoints through a ``checkpoints`` link.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Sequence

import ml_collections

from idmr_jax.train import workdir as layout

LEARNED, BASELINE = "learned", "baseline"
PERTURBATIONS = ("iou0.8", "iou0.5", "no_box")  # "none" is the run's own evaluation


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the study."""

    name: str  # "learned" | "baseline" | "beta<X>"
    config_arg: str  # the argument after ':' in the config path, e.g. "demo,fixed_beta=5"
    seed: int
    workdir: str

    @property
    def metrics_path(self) -> str:
        """Its evaluation's ``metrics.json`` (present once the run is finished)."""
        return os.path.join(self.workdir, layout.EVAL_DIR, "metrics.json")

    @property
    def finished(self) -> bool:
        return os.path.exists(self.metrics_path)

    def perturb_workdir(self, kind: str) -> str:
        """Where the evaluation under box perturbation `kind` writes (``<workdir>/perturb/<kind>``)."""
        return os.path.join(self.workdir, "perturb", kind)


def beta_name(beta: float) -> str:
    """The run name of a fixed beta: ``beta5``, ``beta0.5`` (no trailing ``.0``)."""
    return f"beta{float(beta):g}"


def split_config(spec: str) -> tuple[str, str]:
    """``"configs/oacir.py:demo"`` -> (``"configs/oacir.py"``, ``"demo"``)."""
    path, _, arg = spec.partition(":")
    return path, arg


def _join(arg: str, extra: str) -> str:
    return f"{arg},{extra}" if arg else extra


def plan_runs(config_spec: str, seeds: int, betas: Sequence[float], workdir: str) -> list[Run]:
    """Every run of the study, learned first, then the baseline, then the fixed betas; seeds innermost."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    _, arg = split_config(config_spec)
    keys = {k.partition("=")[0] for k in arg.split(",") if k}
    if keys & {"baseline", "fixed_beta", "roi"}:
        raise ValueError(f"{config_spec}: give the CAAM config; the study adds 'baseline' and 'fixed_beta=X' itself")
    models = [(LEARNED, arg), (BASELINE, _join(arg, "baseline"))]
    models += [(beta_name(b), _join(arg, f"fixed_beta={float(b):g}")) for b in betas if float(b) != 0.0]
    return [Run(name, a, seed, os.path.join(workdir, "runs", name, f"seed{seed}"))
            for name, a in models for seed in range(seeds)]


def load_config(config_spec: str, arg: str, seed: int) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file in `config_spec`, at ``config.seed = config.data.shuffle_seed = seed``,
    in train mode."""
    path, _ = split_config(config_spec)
    spec = importlib.util.spec_from_file_location("_study_config", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the config file {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.seed, config.mode = seed, "train"
    config.data.shuffle_seed = seed
    return config


def saved_config(run_workdir: str) -> ml_collections.ConfigDict:
    """The config saved with the run's latest finished checkpoint (what it really trained with)."""
    step_dir, _ = layout.latest_step(run_workdir)
    return layout.read_config(step_dir)


def check_saved(run: Run, saved: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless the run's saved config is the one its name and folder say (seed, beta mode and
    fixed beta): a point of the sweep must never come from another run's folder."""
    m = saved.model
    want_mode = {LEARNED: "adaptive", BASELINE: "none"}.get(run.name, "fixed")
    problems = []
    if int(saved.seed) != run.seed:
        problems.append(f"seed {saved.seed} (expected {run.seed})")
    shuffle_seed = saved.get("data", {}).get("shuffle_seed", run.seed)
    if int(shuffle_seed) != run.seed:
        problems.append(f"data.shuffle_seed {shuffle_seed} (expected {run.seed})")
    if m.beta_mode != want_mode:
        problems.append(f"beta_mode {m.beta_mode!r} (expected {want_mode!r})")
    if want_mode == "fixed" and beta_name(m.fixed_beta) != run.name:
        problems.append(f"fixed_beta {m.fixed_beta} (expected {run.name[4:]})")
    if problems:
        raise ValueError(f"{run.workdir}: its saved config has " + ", ".join(problems))


# The trainer in-process, as `idmr_jax.main` runs it: (config, workdir) -> results.
Runner = Callable[[ml_collections.ConfigDict, str], dict]


def default_runner() -> Runner:
    """`idmr_jax.main`'s ``run`` for one config: check it, make the data ready, build the task, train or evaluate."""
    from idmr_jax import runtime, tasks
    from idmr_jax.config_checks import check_config
    from idmr_jax.train import trainer

    runtime.initialize()

    def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
        check_config(config)
        config = tasks.prepare_data(config)
        task = tasks.build(config)
        if config.mode == "train":
            results = trainer.train_and_evaluate(task, workdir)
        else:
            results = trainer.evaluate_only(task, workdir)
        if results:
            tasks.print_results(config, results)
        return results

    return run


def train_missing(runs: Sequence[Run], config_spec: str, runner: Runner, log=print) -> list[Run]:
    """Trains every run that is not finished (resuming its checkpoints if any); returns the runs it trained."""
    trained = []
    for i, run in enumerate(runs):
        if run.finished:
            log(f"[{i + 1}/{len(runs)}] {run.name} seed {run.seed}: finished, reused ({run.workdir})")
            continue
        log(f"[{i + 1}/{len(runs)}] {run.name} seed {run.seed}: training ({run.config_arg}) in {run.workdir}")
        runner(load_config(config_spec, run.config_arg, run.seed), run.workdir)
        trained.append(run)
    return trained


def perturbation_evals(runs: Sequence[Run], config_spec: str, kinds: Sequence[str], runner: Runner,
                       log=print) -> list[tuple[Run, str]]:
    """Evaluates each finished run under each box perturbation (``mode=eval``) into its own folder, unless that
    folder's ``metrics.json`` exists; returns the (run, kind) pairs evaluated now."""
    done = []
    for run in runs:
        for kind in kinds:
            out = run.perturb_workdir(kind)
            if os.path.exists(os.path.join(out, layout.EVAL_DIR, "metrics.json")):
                continue
            link = os.path.join(out, layout.CHECKPOINTS_DIR)
            os.makedirs(out, exist_ok=True)
            if not os.path.lexists(link):  # relative: the study folder may be moved as a whole
                os.symlink(os.path.join("..", "..", layout.CHECKPOINTS_DIR), link)
            log(f"eval {run.name} seed {run.seed} under box perturbation {kind}")
            config = load_config(config_spec, run.config_arg, run.seed)
            config.mode, config.eval.box_perturbation = "eval", kind
            runner(config, out)
            done.append((run, kind))
    return done


def describe(runs: Sequence[Run], config_spec: str, kinds: Sequence[str], perturbed: Sequence[str]) -> list[str]:
    """The lines ``--dry-run`` prints: each run (to train, or reused) and each perturbation evaluation."""
    path, _ = split_config(config_spec)
    lines = []
    for run in runs:
        state = "reuse" if run.finished else "train"
        lines.append(f"{state:5s} {run.name:10s} seed {run.seed}  --config={path}:{run.config_arg} "
                     f"--config.seed={run.seed} --workdir={run.workdir}")
    for run in runs:
        if run.name not in perturbed:
            continue
        for kind in kinds:
            have = os.path.exists(os.path.join(run.perturb_workdir(kind), layout.EVAL_DIR, "metrics.json"))
            lines.append(f"{'reuse' if have else 'eval':5s} {run.name:10s} seed {run.seed}  "
                         f"--config.mode=eval --config.eval.box_perturbation={kind} "
                         f"--workdir={run.perturb_workdir(kind)}")
    return lines
