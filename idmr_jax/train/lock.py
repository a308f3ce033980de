"""One run per workdir: ``WORKDIR/.lock``, held by process 0 for the life of a training run.

The lock file is JSON ``{"host", "pid", "start_time"}``. It is created atomically: ``O_CREAT | O_EXCL`` on a local
filesystem; on ``gs://`` through the google-cloud-storage client with ``if_generation_match=0`` (the object is
created only if it does not exist) when that package is installed. Other remote filesystems (and ``gs://``
without google-cloud-storage) get a check-then-write, which is not atomic: two runs started within the same
moment could both pass; a warning says so.

A lock whose holder is a dead process on this host (its pid no longer exists) is taken over with a warning. A
lock from another host cannot be checked from here: the run stops and names the holder; delete the file by hand
once you know that run is gone. The lock is released (the file deleted) when the run ends, also on exceptions.
"""

from __future__ import annotations

import json
import os
import socket
import time

from absl import logging
from etils import epath

from idmr_jax.train import workdir as layout


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


def _holder_text(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start_time", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {started}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _create_exclusive(path: epath.Path, text: str) -> bool:
    """Writes `text` to `path` only if `path` does not exist; False if it already does."""
    if path.as_uri().startswith("file://"):
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if str(path).startswith("gs://"):
        try:
            from google.api_core import exceptions as gexc
            from google.cloud import storage
        except ImportError:
            storage = None
        if storage is not None:
            bucket, _, name = str(path)[len("gs://"):].partition("/")
            try:
                storage.Client().bucket(bucket).blob(name).upload_from_string(text, if_generation_match=0)
            except gexc.PreconditionFailed:
                return False
            return True
    logging.warning("%s: this filesystem has no atomic create here; the workdir lock is check-then-write", path)
    if path.exists():
        return False
    path.write_text(text)
    return True


class WorkdirLock:
    """Context manager: holds ``WORKDIR/.lock`` while the block runs (process 0 only: pass ``enabled=False``
    on the others)."""

    def __init__(self, workdir, *, enabled: bool = True):
        self.path = layout.lock_file(workdir)
        self.enabled = enabled
        self.held = False

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the run that holds it."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time()}
        for _ in range(2):  # the second try follows the removal of a dead holder's lock
            if _create_exclusive(self.path, json.dumps(me)):
                self.held = True
                return
            try:
                holder = json.loads(self.path.read_text())
            except (FileNotFoundError, ValueError):  # removed meanwhile, or written half-way: look again
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                    and not _pid_alive(holder["pid"]):
                msg = (f"warning: taking over the workdir lock {self.path} left by a process that is gone "
                       f"({_holder_text(holder)})")
                logging.warning(msg)
                print(msg)
                self.path.unlink(missing_ok=True)
                continue
            raise WorkdirLockedError(
                f"{self.path}: the workdir is in use by another run ({_holder_text(holder) if holder else 'unknown'}"
                "). Two runs in one workdir overwrite each other's checkpoints: wait for it to end, use another "
                "--workdir, or, if that run is gone (e.g. on another host), delete the lock file.")
        raise WorkdirLockedError(f"{self.path}: could not take the lock (it keeps reappearing)")

    def release(self) -> None:
        """Deletes the lock file if this process holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
