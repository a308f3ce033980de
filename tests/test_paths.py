"""Workdirs and data folders on an object store: the writers and the shard listing go through etils.epath.

``gs://`` is served here by an in-memory fsspec filesystem registered for the ``gs`` protocol, i.e. the same
epath -> fsspec route a real bucket takes (with gcsfs installed). What this covers: every file the metric writer
(JSON lines and TensorBoard events, including a resumed run), the evaluation writer and the result grid produce
reaches that filesystem through epath, the shard listing globs through it, and only process 0 writes. A write
that bypassed epath (``open``, ``os.makedirs``, tensorboardX's own cloud client) would fail, or land on the local
disk, which is checked to stay empty. Not covered: gcsfs itself, and Orbax checkpoints, whose arrays go through
TensorStore's own GCS driver (the multi-process test covers Orbax on a shared local directory).
"""

from __future__ import annotations

import importlib
import io
import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

RUN = "gs://bucket/run"


class InMemoryGCS(MemoryFileSystem):
    """fsspec's memory filesystem answering for gs:// (object names without the scheme, as gcsfs has them)."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").removeprefix("gcs://").strip("/")


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """A fresh in-memory gs:// for one test; the working directory is an empty local folder to watch."""
    from tensorboardX import record_writer

    monkeypatch.setattr(InMemoryGCS, "store", {})
    monkeypatch.setattr(InMemoryGCS, "pseudo_dirs", [""])
    registry = importlib.import_module("fsspec.registry")._registry  # the table register_implementation fills
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, InMemoryGCS)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath's other gs:// route, if TF is present
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", record_writer.REGISTERED_FACTORIES["gs"])
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    local = tmp_path / "cwd"
    local.mkdir()
    monkeypatch.chdir(local)
    yield InMemoryGCS.store
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert list(local.iterdir()) == [], "something was written to the local disk instead of gs://"


def _read_events(data: bytes) -> list:
    """Events of a TFRecord event file (length, crc, payload, crc per record)."""
    from tensorboardX.proto import event_pb2

    events, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_metric_writer_resumes_on_object_store(gcs):
    from idmr_jax.train.metric_writer import MetricWriter

    w = MetricWriter(RUN, 10, progress=False)
    w.write(1, {"loss": 2.5, "R@1": 10.0})
    w.write(2, {"loss": 2.0, "R@1": 20.0})
    w.close()
    w = MetricWriter(RUN, 10, initial_step=2, progress=False)  # a resumed run continues the same file
    w.write(3, {"loss": np.float32(1.5), "R@1": 30.0})
    w.close()

    rows = [json.loads(line) for line in (epath.Path(RUN) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["R@1"]) for r in rows] == [(1, 2.5, 10.0), (2, 2.0, 20.0), (3, 1.5, 30.0)]
    event_files = sorted((epath.Path(RUN) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 2  # one per run
    scalars = [(v.tag, e.step, v.simple_value) for f in event_files for e in _read_events(f.read_bytes())
               for v in e.summary.value]
    assert scalars == [("train/loss", 1, 2.5), ("train/R_at_1", 1, 10.0), ("train/loss", 2, 2.0),
                       ("train/R_at_1", 2, 20.0), ("train/loss", 3, 1.5), ("train/R_at_1", 3, 30.0)]
    assert set(gcs) == {"bucket/run/metrics.jsonl", *(str(f).removeprefix("gs://") for f in event_files)}


def test_eval_outputs_and_result_grid_on_object_store(gcs):
    from idmr_jax.tasks.oacir.pipeline import ImageSpec
    from idmr_jax.tasks.oacir import evaluate as oacir_eval
    from idmr_jax.tasks.oacir import visualize

    records = [{"query_id": "q0", "subset": "fake", "ranking": ["g1", "g0"]}]
    flat = oacir_eval.write_outputs(RUN, {"fake": {"R_ID@1": 50.0, "R@1": 25.0, "R@5": 75.0}}, records)
    assert flat == {"fake/R_ID@1": 50.0, "fake/R@1": 25.0, "fake/R@5": 75.0, "avg": 50.0}
    assert json.loads((epath.Path(RUN) / "eval" / "metrics.json").read_text()) == flat
    assert [json.loads(x) for x in (epath.Path(RUN) / "eval" / "rankings.jsonl").read_text().splitlines()] == records

    def png(color) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (80, 64), color).save(buf, format="PNG")
        return buf.getvalue()

    query = SimpleNamespace(reference_image=png("blue"), reference_box=(8.0, 8.0, 40.0, 40.0),
                            reference_name="ref", target_name="tgt", target_instance="cup",
                            modification_text="the same cup on a table")
    gallery = [SimpleNamespace(name="ref", instance="cup", image=png("blue")),
               SimpleNamespace(name="tgt", instance="cup", image=png("white")),
               SimpleNamespace(name="other", instance="pen", image=png("black"))]
    path = epath.Path(RUN) / "eval" / "fake_results.png"
    visualize.write_grid(path, [query], [[0, 2, 1]], gallery, ImageSpec(size=56, grid=(4, 4)), top=2)
    grid = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    cell = visualize.THUMB + 8
    assert grid.shape[:2] == (cell + 48, 3 * cell)
    # The reference is skipped; rank 1 is the other instance (red frame), rank 2 the target (green frame).
    assert tuple(grid[1, cell + 1]) == visualize.RED and tuple(grid[1, 2 * cell + 1]) == visualize.GREEN


def test_only_process_zero_writes(gcs, monkeypatch):
    import jax

    from idmr_jax.tasks.oacir import evaluate as oacir_eval
    from idmr_jax.train.metric_writer import MetricWriter

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    w = MetricWriter(RUN, 10, progress=False)
    w.write(1, {"loss": 1.0})
    w.close()
    flat = oacir_eval.write_outputs(RUN, {"fake": {"R_ID@1": 1.0, "R@1": 2.0, "R@5": 3.0}}, [{"query_id": "q"}])
    assert flat["avg"] == 2.0  # every process gets the numbers
    assert gcs == {}


def test_shard_listing_on_object_store(gcs):
    from idmr_jax.data.grain_io import list_shards
    from idmr_jax.tasks.oacir import pipeline as oacir_pipeline

    folder = epath.Path("gs://bucket/data/train")
    folder.mkdir(parents=True)
    for name in ("queries-00001-of-00002.array_record", "queries-00000-of-00002.array_record",
                 "gallery-00000-of-00001.array_record", "manifest.json"):
        (folder / name).write_bytes(b"")
    assert list_shards(str(folder), oacir_pipeline.QUERY_GLOB) == [
        "gs://bucket/data/train/queries-00000-of-00002.array_record",
        "gs://bucket/data/train/queries-00001-of-00002.array_record"]
    with pytest.raises(FileNotFoundError, match="gs://bucket/data/val"):
        list_shards("gs://bucket/data/val", oacir_pipeline.QUERY_GLOB)
