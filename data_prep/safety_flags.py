"""The input-safety flags every converter CLI shares: image read rules and manifest ownership."""

from __future__ import annotations

import argparse

from idmr_jax.data.image_files import DEFAULT_MAX_IMAGE_BYTES


def add_safety_flags(p: argparse.ArgumentParser, *, root: str) -> None:
    """Adds ``--max-image-bytes``, ``--follow-external-symlinks`` and ``--overwrite``; `root` names the folder
    image paths must resolve inside (e.g. "--root")."""
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="skip image files larger than this (default %(default)s = 64 MiB)")
    p.add_argument("--follow-external-symlinks", action="store_true",
                   help=f"read images whose path resolves outside {root} (symlinks); they are listed in the "
                   "manifest. Default: skip them ('outside the dataset root'). FIFOs, devices and folders are "
                   "always skipped, never opened")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a manifest.json in --out that this tool did not write (default: refuse)")
