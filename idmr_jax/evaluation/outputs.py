"""The evaluation outputs every task writes: ``WORKDIR/eval/metrics.json`` and ``WORKDIR/eval/rankings.jsonl`` (or
one pair per benchmark, ``WORKDIR/eval/<benchmark>/``).

`workdir` may be local or remote (``gs://...``): writes go through etils.epath. On a multi-process run only
process 0 writes (`write_results`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping


def eval_dir(workdir: str | os.PathLike, subdir: str = ""):
    """``WORKDIR/eval`` (or ``WORKDIR/eval/<subdir>``, e.g. one benchmark's) as an ``epath.Path``, created if
    missing."""
    from etils import epath

    out = epath.Path(workdir) / "eval"
    if subdir:
        out = out / subdir
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_metrics(workdir: str | os.PathLike, metrics: Mapping[str, float], subdir: str = "") -> str:
    """Writes ``WORKDIR/eval[/<subdir>]/metrics.json`` (a flat JSON object, values in percent); returns its path.

    Callers on a multi-host run write from process 0 only (see `write_results`).
    """
    out = eval_dir(workdir, subdir) / "metrics.json"
    out.write_text(json.dumps({k: float(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")
    return os.fspath(out)


def write_rankings(workdir: str | os.PathLike, rankings: Iterable[Mapping], subdir: str = "") -> str:
    """Writes ``WORKDIR/eval[/<subdir>]/rankings.jsonl``, one JSON record per query; returns its path."""
    out = eval_dir(workdir, subdir) / "rankings.jsonl"
    out.write_text("".join(json.dumps(dict(rec)) + "\n" for rec in rankings))
    return os.fspath(out)


def write_results(workdir: str | os.PathLike, metrics: Mapping[str, float], rankings: Iterable[Mapping],
                  subdir: str = "") -> None:
    """`write_metrics` and `write_rankings`, from process 0 only (every process holds the same results)."""
    import jax

    if jax.process_index() != 0:
        return
    write_metrics(workdir, metrics, subdir)
    write_rankings(workdir, rankings, subdir)
