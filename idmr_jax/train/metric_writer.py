"""Metrics out: JSON lines, TensorBoard event files and a console progress bar, from process 0 only.

The workdir may be local or on an object store (``gs://``): every file goes through ``etils.epath``. Object
stores have no append, so there a file is held in memory and the whole object is replaced at each flush
(metric files are small: one line per logging interval); locally, files are appended to as usual.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import jax
import numpy as np
from etils import epath

from idmr_jax import paths


def summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without importing PyTorch.

    tensorboardX imports ``torch`` at module level whenever it is installed, only so that its histogram and image
    calls accept torch tensors; here it writes float scalars. PyTorch is installed next to this package (the
    reference ports and the baselines), and importing it took 1.2 s of every training start on an idle 2-core
    machine (2.8 s under load). So, unless torch is imported already, ``import torch`` fails for the duration of
    this import, which tensorboardX handles (torch tensors are then not special-cased, and none are passed).
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # a None entry makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class ReplacingFile:
    """A binary file on an object store that is rewritten whole at every flush (readers see each version).

    With ``keep_existing`` the object's current content is kept in front (a resumed run continues the file).
    """

    def __init__(self, path: str | os.PathLike, *, keep_existing: bool = False):
        self.path = epath.Path(path)
        self._buffer = io.BytesIO()
        if keep_existing and self.path.exists():
            self._buffer.write(self.path.read_bytes())

    def write(self, data: bytes) -> int:
        return self._buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EventFileFactory:
    """tensorboardX writer factory: event files through epath instead of tensorboardX's own cloud clients."""

    def open(self, path: str) -> ReplacingFile:
        return ReplacingFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _route_event_files(workdir: epath.Path) -> None:
    """Makes tensorboardX write event files under `workdir`'s URI scheme (e.g. ``gs``) through epath."""
    if not paths.is_local(workdir):
        from tensorboardX import record_writer

        record_writer.register_writer_factory(os.fspath(workdir).split("://", 1)[0], _EventFileFactory())


def _metric_order(name: str) -> tuple:
    """R@k before R_ID@k, each by k; anything else after, by name."""
    family, _, k = name.partition("@")
    return (0, family, int(k)) if k.isdigit() else (1, name, 0)


def results_table(results: dict[str, float], title: str = "results") -> str:
    """Evaluation metrics as a text table: one row per subset (``"<subset>/<metric>"`` keys; plain keys form a row
    of their own), one column per metric, ``avg`` on the title line."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        if key == "avg":
            continue
        subset, _, metric = key.rpartition("/")
        rows.setdefault(subset, {})[metric] = float(value)
    columns = sorted({m for row in rows.values() for m in row}, key=_metric_order)
    first = max([len("subset"), *(len(r) for r in rows)])
    widths = [max(len(c), 6) for c in columns]
    head = title + (f"  (avg {float(results['avg']):.2f})" if "avg" in results else "")
    lines = [head, "  ".join(["subset".ljust(first), *(c.rjust(w) for c, w in zip(columns, widths))])]
    for subset, row in sorted(rows.items()):
        cells = [f"{row[c]:.2f}".rjust(w) if c in row else "-".rjust(w) for c, w in zip(columns, widths)]
        lines.append("  ".join([(subset or "all").ljust(first), *cells]))
    return "\n".join(lines)


# Seconds between two progress lines when stderr is not a terminal.
NON_TERMINAL_REFRESH_S = 30.0


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard summaries under ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str | epath.Path, total_steps: int, *, initial_step: int = 0, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._bar = None
        # In a terminal the bar redraws in place. Into a file (nohup, CI, a batch system's log) every redraw is
        # kept, so there it redraws only every NON_TERMINAL_REFRESH_S.
        self._interactive = sys.stderr.isatty()
        if not self.enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        jsonl = workdir / "metrics.jsonl"
        self._jsonl = jsonl.open("ab") if paths.is_local(jsonl) else ReplacingFile(jsonl, keep_existing=True)
        SummaryWriter = summary_writer_class()  # imported lazily: only process 0 writes summaries  # noqa: N806
        _route_event_files(workdir)
        # Event files are named by the second they were created; the start step keeps a run that resumes within
        # the same second from replacing the previous run's file.
        self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"), filename_suffix=f".from_step_{initial_step}")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, desc="train",
                             mininterval=0.1 if self._interactive else NON_TERMINAL_REFRESH_S)
            self._bar.set_postfix_str("compiling the train step")  # the first step waits for XLA

    def write(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        """Logs scalar metrics for `step` (device arrays are fetched here, once per logging interval)."""
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, "time": time.time(), **scalars}
        self._jsonl.write((json.dumps(record) + "\n").encode())
        self._jsonl.flush()
        for k, v in scalars.items():
            # TensorBoard tag names allow [A-Za-z0-9_./-]: "R@1" becomes "R_at_1".
            self._tb.add_scalar(f"{prefix}/{k}".replace("@", "_at_"), v, step)
        self._tb.flush()
        if self._bar is not None and prefix == "train":
            self._bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "beta_mean") if k in scalars},
                                  refresh=self._interactive)

    def advance(self, step: int) -> None:
        """Moves the progress bar to `step` (drawn at most every ``mininterval``)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()
