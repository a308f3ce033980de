"""``python -m idmr_jax.bench SUITE [flags]``: runs one benchmark suite, prints its JSON and writes it to --out.

Suites: train_step, mfu, retrieval, input, loss_memory, real_size, mbeir_memory (see each module's docstring for
its flags, or ``python -m idmr_jax.bench SUITE --help``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUITES = ("train_step", "mfu", "retrieval", "input", "loss_memory", "real_size", "mbeir_memory")
_MODULES = {"input": "input_pipeline"}  # `input` shadows a builtin as a module name


def _suite_module(name: str):
    return importlib.import_module(f"idmr_jax.bench.{_MODULES.get(name, name)}")


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="python -m idmr_jax.bench", description=__doc__.split("\n")[0],
                                  add_help=False)
    top.add_argument("suite", nargs="?", choices=SUITES)
    known, rest = top.parse_known_args(argv)
    if known.suite is None:
        top.print_help()
        raise SystemExit(2)
    module = _suite_module(known.suite)  # suite modules import JAX lazily, inside run()
    if hasattr(module, "before_jax"):
        module.before_jax(rest)  # process-level settings that only take effect before JAX initialises
    parser = argparse.ArgumentParser(prog=f"python -m idmr_jax.bench {known.suite}",
                                     description=(module.__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--out", default=None, help="write the JSON result here (local path or gs://)")
    module.add_args(parser)
    args = parser.parse_args(rest)

    import idmr_jax  # noqa: F401  (flax config)
    from idmr_jax.bench import common

    return common.finish(module.run(args), args.out)


if __name__ == "__main__":  # the guard matters: Grain spawns worker processes that re-import this module
    main()
