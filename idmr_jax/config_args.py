"""The keyword argument of a config file: ``configs/oacir.py:paper,fixed_beta=0.5`` -> {"paper": "1", ...}."""

from __future__ import annotations

from collections.abc import Iterable


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
