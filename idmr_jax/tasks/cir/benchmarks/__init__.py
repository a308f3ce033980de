"""The benchmark registry: one module per benchmark in this folder (contract: `base`), found by its file name, so
adding a benchmark is adding its file."""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

_NOT_BENCHMARKS = {"base"}


def names() -> tuple[str, ...]:
    """Every benchmark's name, sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in _NOT_BENCHMARKS and not m.name.startswith("_")))


def get(name: str) -> ModuleType:
    """The benchmark module `name`; ValueError listing the known ones otherwise."""
    if name not in names():
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")
