"""The keyword argument of a config file: ``configs/oacir.py:paper,fixed_beta=0.5`` -> {"paper": "1", ...}."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable
from types import ModuleType


def parse_config_args(arg: str | None, known: Iterable[str]) -> dict[str, str]:
    """The comma-separated keywords after ``:`` in ``--config=FILE:ARG`` as {keyword: value}.

    ``key=value`` gives the value as a string, a bare ``key`` gives "1". A keyword not in `known` is a ValueError
    naming it and listing the known ones (a typo must not silently run the default recipe).
    """
    out = {}
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip() or "1"
    known = set(known)
    if unknown := set(out) - known:
        raise ValueError(f"unknown config keywords {sorted(unknown)}; known: {sorted(known)}")
    return out


def sibling_config(config_file: str, name: str) -> ModuleType:
    """The config file `name` (e.g. "idmr.py") next to `config_file`, loaded by path as ml_collections loads config
    files, so that one config can build on another without ``configs/`` being importable."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
    spec = importlib.util.spec_from_file_location(f"_config_{os.path.splitext(name)[0]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
