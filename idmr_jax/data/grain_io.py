"""Grain plumbing every task's input pipeline shares: shard listing, record access, per-process shares and batch
rows, the batching tail, and an iterator whose state is saved with each checkpoint.

Multi-process data layout (the same for the real pipelines and the synthetic ones): every process reads its own
share of the records (`process_share`) and yields its own rows of each global batch (`process_batch_rows`); the
trainer assembles the global batch from the processes' rows in process order.

Grain is imported inside the functions that need it, so the synthetic (fake) sources stay free of it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading

from PIL import Image


def list_shards(folder: str | os.PathLike, pattern: str) -> list[str]:
    """Paths of the shards matching `pattern` in `folder` (local or gs://: globbed with etils.epath), in sorted
    order (the order that keys stored in records refer to); an error naming the folder if none match."""
    from etils import epath

    paths = sorted(os.fspath(p) for p in epath.Path(folder).glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no shard matches {pattern!r} in {os.fspath(folder)!r}")
    return paths


def decode_image(data: bytes, *, source: str) -> Image.Image:
    """An encoded image (JPEG, PNG, ...) as an RGB PIL image; a ValueError naming `source` (the record and field)
    if it does not decode."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:  # noqa: BLE001 - a broken image names its record
        raise ValueError(f"{source}: image does not decode ({type(e).__name__}: {e})") from e


class RecordReader:
    """Random access to the raw records of ArrayRecord shards by global key (shards concatenated in sorted order).

    Opened lazily and reopened after unpickling, so it travels into Grain's spawned workers; the open is locked
    because Grain calls map transforms from several reader threads.
    """

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self._source = None
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"paths": self.paths}

    def __setstate__(self, state):
        self.paths, self._source, self._lock = state["paths"], None, threading.Lock()

    def _open(self):
        if self._source is None:
            with self._lock:
                if self._source is None:
                    import grain

                    self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return self._source

    def raw(self, key: int) -> bytes:
        """The record bytes at global `key`."""
        return self._open()[int(key)]

    def __len__(self) -> int:
        return len(self._open())


class CheckpointableIterator:
    """A Grain iterator plus its epoch length; ``get_state``/``set_state`` round-trip through checkpoints (a
    JSON-serialisable state), so a resumed run sees exactly the examples an uninterrupted run would have seen.

    Iterating an mp_prefetch pipeline starts worker processes: call `close` (or use it as a context manager)
    when done, rather than leaving the clean-up to garbage collection at interpreter exit.
    """

    def __init__(self, it, steps_per_epoch: int):
        self._it, self.steps_per_epoch = it, steps_per_epoch

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def get_state(self):
        """The wrapped iterator's state (saved with each checkpoint)."""
        return self._it.get_state()

    def set_state(self, state):
        """Restores a state from `get_state`."""
        self._it.set_state(state)

    def close(self) -> None:
        """Stops the worker processes, if any."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags (``--grain_*``); outside ``absl.app.run`` (tests, notebooks,
    plain scripts) nothing parses them and the first read raises ``UnparsedFlagAccessError``, so mark them parsed
    with their defaults. A no-op under ``absl.app``."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def process_share(num_records: int, index: int, count: int) -> slice:
    """Process `index`'s record keys of `count`: every count-th key, the remainder dropped so that all processes
    hold the same number of keys (their epochs, and so their reshuffles, stay aligned)."""
    per_process = num_records // count
    return slice(index, per_process * count, count)


def process_batch_rows(global_batch: int, index: int, count: int) -> slice:
    """The rows of each global batch that process `index` of `count` supplies: an equal, contiguous block, in
    process order. Raises ValueError when the global batch does not divide over the processes."""
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not divide over {count} processes")
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


@dataclasses.dataclass(frozen=True)
class ProcessPlan:
    """This process's part of a training set: its record `keys` (a slice of the global key range), how many
    that is, and its rows per global batch."""

    keys: slice
    num_keys: int
    local_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_keys // self.local_batch


def plan_process(num_records: int, global_batch: int, *, what: str = "records") -> ProcessPlan:
    """This JAX process's `ProcessPlan` (`process_share` and `process_batch_rows`); a ValueError when a process
    would hold fewer records than its per-process batch. `what` names the records in that message."""
    import grain

    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    rows = process_batch_rows(global_batch, shard.shard_index, shard.shard_count)
    keys = process_share(num_records, shard.shard_index, shard.shard_count)
    num_keys, local_batch = len(range(num_records)[keys]), rows.stop - rows.start
    if num_keys < local_batch:
        raise ValueError(f"{num_records} {what} give {num_keys} per process, fewer than the per-process batch "
                         f"{local_batch}")
    return ProcessPlan(keys=keys, num_keys=num_keys, local_batch=local_batch)


def check_worker_count(num_workers: int, num_shards: int, *, shards: str = "shards", remedy: str) -> None:
    """Each Grain worker reads whole shards: more workers than this host's shards (`num_shards` over all hosts)
    fail fast, naming the ``shards`` and the `remedy`."""
    import grain

    hosts = grain.sharding.ShardByJaxProcess(drop_remainder=True).shard_count
    per_host = num_shards // hosts
    if num_workers > max(per_host, 1):
        raise ValueError(f"{num_workers} data workers but only {num_shards} {shards} for {hosts} host(s) "
                         f"({per_host} per host): lower config.data.num_workers or {remedy}")


def batched_iterator(ds, plan: ProcessPlan, *, num_workers: int, read_threads: int = 2,
                     batch_map=None) -> CheckpointableIterator:
    """The shared tail of a training pipeline: `ds` (a per-example ``MapDataset``) read with `read_threads`
    threads, batched into the plan's per-process batches (the last partial one dropped), each batch passed through
    `batch_map` (a ``grain.transforms.Map`` over whole batches) if given, optionally spread over `num_workers`
    worker processes."""
    import grain

    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(read_threads, 1), prefetch_buffer_size=64))
    it = it.batch(plan.local_batch, drop_remainder=True)
    if batch_map is not None:
        it = it.map(batch_map)
    if num_workers > 0:
        ensure_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return CheckpointableIterator(iter(it), steps_per_epoch=plan.steps_per_epoch)
