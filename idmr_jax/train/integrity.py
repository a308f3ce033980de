"""Checkpoint integrity: a sha256 per file, written once a save is final and checked before a restore; checkpoints
that fail are moved aside to ``checkpoints/corrupt/<step>-<reason>`` (never deleted).

``checkpoints/<step>/checksums.json`` maps every file of the step (relative path, e.g. ``state/ocdbt.process_0/d/…``)
to ``[size, sha256]``. A step without it (a run killed between the save and the checksums, or saved before they
existed) cannot be verified and is restored with a warning. Files are hashed in threads (hashlib releases the GIL),
so verification runs at storage speed on several cores (see BENCHMARKS.md, "Checkpoint verification").
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

from absl import logging
from etils import epath

from idmr_jax.train import workdir as layout

_CHUNK = 8 << 20


def _files(step_dir: epath.Path) -> list[str]:
    """Relative paths of all files of a step directory, except the checksum file itself."""
    out, folders = [], [step_dir]
    while folders:  # a walk by listing: epath's rglob is not available on every filesystem (gs://)
        for path in folders.pop().iterdir():
            if path.is_dir():
                folders.append(path)
            elif path.name != layout.CHECKSUMS_FILE or path.parent != step_dir:
                out.append(str(path.relative_to(step_dir)))
    return sorted(out)


def _digest(path: epath.Path) -> list:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return [size, h.hexdigest()]


def checksum_dir(step_dir, files: list[str] | None = None, threads: int = 8) -> dict[str, list]:
    """``{relative path: [size, sha256]}`` for the files of `step_dir` (all of them unless `files` is given)."""
    step_dir = epath.Path(step_dir)
    files = _files(step_dir) if files is None else files
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(files, pool.map(lambda rel: _digest(step_dir / rel), files)))


def write_checksums(step_dir) -> None:
    """Writes ``<step_dir>/checksums.json``; call once the step is final (after Orbax's wait, all processes)."""
    step_dir = epath.Path(step_dir)
    tmp = step_dir / (layout.CHECKSUMS_FILE + ".tmp")
    tmp.write_text(json.dumps(checksum_dir(step_dir), indent=0, sort_keys=True))
    tmp.rename(step_dir / layout.CHECKSUMS_FILE)  # a reader never sees half a list


def verify(step_dir) -> str | None:
    """None if every file of `step_dir` matches its recorded checksum (or none are recorded: warned), else the
    reason it does not (a short text)."""
    step_dir = epath.Path(step_dir)
    listing = step_dir / layout.CHECKSUMS_FILE
    if not listing.exists():
        logging.warning("%s has no %s: restored without verification", step_dir, layout.CHECKSUMS_FILE)
        print(f"warning: checkpoint {step_dir.name} has no checksums (saved by a run that stopped right after it?); "
              "restoring it unverified")
        return None
    expected = json.loads(listing.read_text())
    start = time.perf_counter()
    missing = [rel for rel in expected if not (step_dir / rel).exists()]
    if missing:
        return f"missing file {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    actual = checksum_dir(step_dir, list(expected))
    bad = [rel for rel in expected if actual[rel] != expected[rel]]
    logging.info("verified %d files of %s in %.2f s", len(expected), step_dir, time.perf_counter() - start)
    if bad:
        return f"checksum mismatch in {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
    return None


def quarantine(step_dir, reason: str) -> epath.Path:
    """Moves a corrupt step directory to ``checkpoints/corrupt/<step>-<reason>`` (a new name if that exists)."""
    step_dir = epath.Path(step_dir)
    target_dir = step_dir.parent / layout.CORRUPT_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{step_dir.name}-{reason}"
    n = 1
    while target.exists():
        n += 1
        target = target_dir / f"{step_dir.name}-{reason}-{n}"
    step_dir.rename(target)
    return target
