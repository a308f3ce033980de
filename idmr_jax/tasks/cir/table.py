"""The zero-shot table: a column per benchmark metric, a row per model.

``python -m idmr_jax.main --config=configs/cir_eval.py:all ...`` prints it for its model; to put several models side
by side, run each into its own workdir and

    python -m idmr_jax.tasks.cir.table WORKDIR_A WORKDIR_B ...

which reads each ``WORKDIR/eval/<bench>/metrics.json`` and the row name in ``WORKDIR/eval/model.json``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

from etils import epath

# The columns in the order the papers print them (others follow, sorted).
HEADLINE = ("cirr/R@1", "cirr/R@5", "cirr/R@10", "cirr/R@50", "cirr/Rs@1", "cirr/Rs@2", "cirr/Rs@3", "cirr/avg",
            "circo/mAP@5", "circo/mAP@10", "circo/mAP@25", "circo/mAP@50", "fashioniq/avg/R@10",
            "fashioniq/avg/R@50", "genecis/avg/R@1")


def model_name(config) -> str:
    """The row name of a run: ``config.cir.model_name``, else the family and the weights' source."""
    if config.cir.model_name:
        return config.cir.model_name
    init = config.model.init
    source = os.path.basename(os.path.normpath(init.path)) if init.path else init.format
    return f"{config.cir.family}:{init.format}:{source}" if init.path else f"{config.cir.family}:{source}"


def zero_shot_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = HEADLINE) -> str:
    """Rows (model -> flat metrics) as a text table; only the `columns` some row has, then any other
    benchmark-level column, so that per-category entries do not flood it."""
    present = {k for r in rows.values() for k in r}
    cols = [c for c in columns if c in present]
    cols += sorted(k for k in present if k not in cols and k.count("/") == 1 and k not in columns)
    first = max([len("model"), *(len(n) for n in rows)])
    widths = [max(len(c), 6) for c in cols]
    lines = ["  ".join(["model".ljust(first), *(c.rjust(w) for c, w in zip(cols, widths))])]
    for name, r in rows.items():
        cells = [f"{r[c]:.2f}".rjust(w) if c in r else "-".rjust(w) for c, w in zip(cols, widths)]
        lines.append("  ".join([name.ljust(first), *cells]))
    return "\n".join(lines)


def read_row(workdir) -> tuple[str, dict[str, float]]:
    """(row name, flat metrics of every benchmark) of an evaluation workdir."""
    ev = epath.Path(workdir) / "eval"
    meta = ev / "model.json"
    name = json.loads(meta.read_text())["name"] if meta.exists() else str(workdir)
    metrics: dict[str, float] = {}
    for f in sorted(ev.glob("*/metrics.json")):
        metrics.update(json.loads(f.read_text()))
    return name, metrics


def main(argv: Sequence[str]) -> int:
    """CLI: the table of the evaluation workdirs `argv`."""
    if not argv:
        print(__doc__)
        return 2
    print(zero_shot_table(dict(read_row(w) for w in argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
