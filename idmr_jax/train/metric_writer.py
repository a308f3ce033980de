"""Metrics out: JSON lines, TensorBoard event files and a console progress bar, from process 0 only."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from etils import epath


class MetricWriter:
    """Writes ``WORKDIR/metrics.jsonl`` and TensorBoard summaries under ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: str | epath.Path, total_steps: int, *, initial_step: int = 0, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self._bar = None
        if not self.enabled:
            return
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (workdir / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes summaries

        self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        """Logs scalar metrics for `step` (device arrays are fetched here, once per logging interval)."""
        if not self.enabled:
            return
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
        record = {"step": step, "split": prefix, "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            # TensorBoard tag names allow [A-Za-z0-9_./-]: "R@1" becomes "R_at_1".
            self._tb.add_scalar(f"{prefix}/{k}".replace("@", "_at_"), v, step)
        self._tb.flush()
        if self._bar is not None and prefix == "train":
            self._bar.set_postfix({k: f"{scalars[k]:.4g}" for k in ("loss", "beta_mean") if k in scalars})

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()
