"""Resumable, deterministic, process-parallel writer of ArrayRecord shards, shared by the dataset converters.

The converters (`idmr_jax.tasks.oacir.release`, `idmr_jax.tasks.idmr.synth`; CLIs in ``data_prep/``) plan their
output here and raise `ConversionError` on input they cannot convert.

A converter describes its output as a list of `ShardPlan`s: a file name, a *content digest* (a hash of every
input that decides the shard's bytes: record metadata, source file sizes and mtimes, options, tool version) and a
picklable task. `write_shards` then, for each plan:

- reuses the shard when the state file records the same content digest for it and the file on disk still has the
  recorded sha256 (so a crash, a deleted shard or a changed input only redoes what is affected);
- otherwise runs the converter's top-level ``produce(task) -> Iterable[bytes]`` (in a spawned worker process when
  given a `process_pool`: one shard is one work unit), writes the records to a temporary name and renames it into place
  atomically, so a shard file either is complete or does not exist.

The state file is rewritten (atomically) after every finished shard: it is the partial manifest a resumed run
starts from. Records are written with fixed writer options, so equal records give byte-identical shards no matter
which process wrote them or in which order shards finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter

from idmr_jax.data import image_files

# group_size:1 makes every record its own chunk: Grain reads records at random, and a larger group would
# decompress whole groups per lookup. No compression: records are dominated by already-compressed image bytes.
# max_parallelism:1 keeps the writer from spawning threads inside worker processes (parallelism is per shard).
WRITER_OPTIONS = "group_size:1,uncompressed,max_parallelism:1"
STATE_FILE = ".convert_state.json"


class ConversionError(RuntimeError):
    """The input cannot be converted (broken layout, or any bad entry under --strict)."""


@dataclasses.dataclass(frozen=True)
class Skip:
    """One input entry a converter did not convert as is (listed in its manifest's ``skipped``). ``index`` is the
    entry's position in ``file`` (list index or the position of the key in a JSON object); ``action`` says what
    happened to it."""

    file: str
    index: int | None
    name: str | None
    field: str
    code: str
    reason: str
    action: str  # e.g. "record_skipped" | "box_dropped" | "entry_ignored"

    def describe(self) -> str:
        """One line naming the file, the record and the field."""
        return f"{self.file}: record {self.index} ({self.name!r}), field '{self.field}': {self.reason} [{self.code}]"


def shard_name(prefix: str, index: int, count: int) -> str:
    """The shard naming scheme: ``<prefix>-00003-of-00008.array_record`` (sorts in shard order)."""
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def split_contiguous(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Deterministic contiguous [start, stop) ranges; sizes differ by at most one, the larger ones first.

    Contiguous (rather than round-robin) ranges keep a record's global key equal to its position in the stable
    source order, which is what lets query records point at gallery records by key.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_items, num_shards)
    ranges, start = [], 0
    for i in range(num_shards):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``: the content digest of a shard plan."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes canonical, human-readable JSON via a temporary file and an atomic rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def check_manifest_owner(path: str | os.PathLike, tool: str, *, overwrite: bool = False) -> None:
    """Raises `ConversionError` when ``path`` (an output folder's manifest) exists and ``tool`` did not write it:
    its ``tool`` field (``{"name": ...}``) names another tool, or it is not JSON or has no tool field. A converter
    calls this before writing anything, so a folder holding someone else's data is left alone; ``overwrite``
    (the CLIs' --overwrite) skips the check."""
    path = os.fspath(path)
    if overwrite or not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f).get("tool")
        owner = owner.get("name") if isinstance(owner, dict) else owner
        found = f"it was written by {owner!r}" if owner else "it has no tool field"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):  # not JSON, not an object, unreadable
        owner, found = None, "it is not a JSON manifest"
    if owner != tool:
        raise ConversionError(f"{path} exists and {tool} did not write it ({found}); pass --overwrite to replace "
                              "it, or choose another --out")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One output shard: its file name, the digest of its inputs, and the picklable task that produces it."""

    file: str
    digest: str
    task: Any


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """A finished shard as recorded in the state file and the manifest."""

    file: str
    records: int
    sha256: str
    bytes: int


class ShardState:
    """The state file of one output folder: which shards are finished, from which inputs, with which checksum.

    ``identity`` (e.g. dataset, variant, split) is stored too, so two different conversions never share, and
    silently overwrite, one output folder.
    """

    def __init__(self, out_dir: str | os.PathLike, identity: dict[str, Any]):
        self.path = os.path.join(os.fspath(out_dir), STATE_FILE)
        self.identity = identity
        self.shards: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("identity") != identity:
                raise RuntimeError(
                    f"{out_dir} holds the output of another conversion ({saved.get('identity')}); "
                    f"use a separate output folder for {identity}"
                )
            self.shards = saved.get("shards", {})

    def finished(self, plan: ShardPlan, out_dir: str) -> ShardInfo | None:
        """The recorded shard if it was written from the same inputs and its file is intact, else None."""
        entry = self.shards.get(plan.file)
        path = os.path.join(out_dir, plan.file)
        if entry is None or entry.get("digest") != plan.digest or not os.path.isfile(path):
            return None
        if os.path.getsize(path) != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            return None
        return ShardInfo(plan.file, entry["records"], entry["sha256"], entry["bytes"])

    def record(self, plan: ShardPlan, info: ShardInfo) -> None:
        """Marks a shard finished and persists the state at once (a crash right after keeps it)."""
        self.shards[plan.file] = {"digest": plan.digest, **dataclasses.asdict(info)}
        self.shards[plan.file].pop("file")
        write_json_atomic(self.path, {"identity": self.identity, "shards": self.shards})


def _produce_shard(args: tuple[Callable[[Any], Iterable[bytes]], str, ShardPlan]) -> ShardInfo:
    """Worker entry point (top level, so spawned processes can unpickle it): write one shard atomically."""
    produce, out_dir, plan = args
    final = os.path.join(out_dir, plan.file)
    tmp = os.path.join(out_dir, f".{plan.file}.tmp-{os.getpid()}")
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    count = 0
    try:
        # ok() turns False on any write error and also once the writer is closed: check it before closing.
        if not writer.ok():
            raise OSError(f"cannot open {tmp} for writing")
        for record in produce(plan.task):
            writer.write(record)
            count += 1
        if not writer.ok():
            raise OSError(f"ArrayRecord writer failed on {tmp}")
        writer.close()
    except BaseException:
        if writer.is_open():
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    info = ShardInfo(plan.file, count, file_sha256(tmp), os.path.getsize(tmp))
    os.replace(tmp, final)
    return info


def process_pool(workers: int) -> contextlib.AbstractContextManager[Any]:
    """A ``spawn`` process pool for ``workers > 1``, else a context yielding None (run in this process).

    Spawn, not fork: forking a parent that holds threads (JAX, array_record readers) can deadlock. One pool should
    serve a whole conversion, since each spawned worker pays the imports once.
    """
    if workers > 1:
        return multiprocessing.get_context("spawn").Pool(workers)
    return contextlib.nullcontext()


def write_shards(
    out_dir: str | os.PathLike,
    plans: Sequence[ShardPlan],
    produce: Callable[[Any], Iterable[bytes]],
    state: ShardState,
    *,
    pool: Any = None,
) -> tuple[list[ShardInfo], list[str], list[str]]:
    """Writes (or reuses) every planned shard; returns (infos in plan order, files written, files reused).

    ``produce`` must be a module-level function: with a `process_pool` it runs in spawned processes (the calling
    program needs a ``__main__`` guard).
    """
    out_dir = os.fspath(out_dir)
    names = [p.file for p in plans]
    if len(set(names)) != len(names):
        raise ValueError("shard plans must have distinct file names")
    infos: dict[str, ShardInfo] = {}
    todo: list[ShardPlan] = []
    for plan in plans:
        info = state.finished(plan, out_dir)
        if info is None:
            todo.append(plan)
        else:
            infos[plan.file] = info
    reused = [p.file for p in plans if p.file in infos]
    for plan in todo:  # leftovers of a killed run (the rename never happened); one converter per folder
        for stale in glob.glob(os.path.join(glob.escape(out_dir), f".{glob.escape(plan.file)}.tmp-*")):
            os.remove(stale)
    by_file = {p.file: p for p in plans}
    jobs = [(produce, out_dir, p) for p in todo]
    # Unordered: the state is updated as each shard lands, so an interrupted run loses at most the shards in
    # flight. The outputs do not depend on completion order.
    results = pool.imap_unordered(_produce_shard, jobs) if pool is not None else map(_produce_shard, jobs)
    for info in results:
        state.record(by_file[info.file], info)
        infos[info.file] = info
        logging.info("wrote %s (%d records)", info.file, info.records)
    return [infos[n] for n in names], [p.file for p in todo], reused


def map_parallel(fn: Callable[[Any], Any], items: Sequence[Any], pool: Any = None) -> list[Any]:
    """``[fn(x) for x in items]``, over a `process_pool` when given one (order preserved)."""
    if pool is not None:
        return pool.map(fn, items)
    return [fn(x) for x in items]


# --- what the converters share besides the shard writer ------------------------------------------------------------


def _probe_chunk(args: tuple[list[str], str, image_files.ReadRules]) -> list[dict]:
    paths, root, rules = args
    return [image_files.probe_image(p, root, rules) for p in paths]


def probe_image_files(paths: Sequence[str], root: str, rules: image_files.ReadRules, pool: Any = None,
                      chunk: int = 256) -> list[dict]:
    """`image_files.probe_image` of every path (read under `rules`, fully decoded), in chunks over `pool`'s
    processes (`process_pool`; None = this process); results in path order."""
    chunks = [list(paths[i:i + chunk]) for i in range(0, len(paths), chunk)]
    return [p for done in map_parallel(_probe_chunk, [(c, root, rules) for c in chunks], pool) for p in done]


def report_skips(skips: Sequence[Skip], *, strict: bool) -> None:
    """Under `strict`, a `ConversionError` listing every skip by file, record and field; otherwise one warning each
    (the manifest lists them too)."""
    if strict and skips:
        lines = "\n".join(s.describe() for s in skips)
        raise ConversionError(f"--strict: {len(skips)} bad input entr{'y' if len(skips) == 1 else 'ies'}:\n{lines}")
    for s in skips:
        logging.warning("skipped: %s", s.describe())


def open_shard_state(out_dir: str | os.PathLike, identity: dict[str, Any]) -> ShardState:
    """`ShardState` for `out_dir`, its refusal (another conversion's state) as a `ConversionError`."""
    try:
        return ShardState(out_dir, identity)
    except RuntimeError as e:
        raise ConversionError(str(e)) from e
