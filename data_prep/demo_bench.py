"""CLI of the real-photo demo benchmark builder (`idmr_jax.data.demo_bench.builder`, where the recipe is described).

    python -m data_prep.demo_bench --out /data/demo [--seed 0] [--size small|tiny] [--kind standard|context] [--force]
    python -m data_prep.oacirr --root /data/demo --variant Demo --split val --out /data/ar/demo-val
    (--kind context writes variant DemoContext: convert with --variant DemoContext)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from idmr_jax.data.demo_bench.builder import SIZES, VARIANTS, build_demo_benchmark


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: builds (or reuses) the benchmark and prints its root."""
    p = argparse.ArgumentParser(description="A small, deterministic OACIR benchmark from real photographs, written "
                                "in the released OACIRR layout.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset root to write (or reuse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--kind", choices=sorted(VARIANTS), default="standard",
                   help="standard: every text changes the context; context: half of them keep it (plan.KINDS)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching build is there")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_demo_benchmark(a.out, seed=a.seed, size=a.size, force=a.force, kind=a.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
