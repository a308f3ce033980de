"""Paths, without JAX: local or on an object store, and where idmr_jax keeps its per-user caches.

The caches are ``$XDG_CACHE_HOME/idmr_jax/<name>`` (default ``~/.cache/idmr_jax``): the demos keep their built
benchmarks there (``demo``, ``idmr_demo``, ``universal_demo``) and ``idmr_jax.main`` its compiled programs
(``xla``, see `idmr_jax.runtime.enable_compilation_cache`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def is_local(path: str | os.PathLike) -> bool:
    """True for paths on the local filesystem, False for object-store URIs such as ``gs://bucket/x``."""
    return "://" not in os.fspath(path)


def cache_dir(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CACHE_HOME/idmr_jax/<name>`` (default ``~/.cache/idmr_jax/<name>``)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idmr_jax", name)
