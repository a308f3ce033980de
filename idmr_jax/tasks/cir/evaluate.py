"""The CIR evaluation: candidates and queries encoded once, rankings, the official metrics or submission files.

For each benchmark of ``config.cir.benchmarks`` with converted shards (``config.data.val_dir`` for one benchmark,
``config.cir.val_dirs.<bench>`` for several), it writes into ``WORKDIR/eval/<bench>/``:

- ``metrics.json``: the benchmark's official metrics, flat keys in percent (labelled splits only);
- ``rankings.jsonl``: ``{"query_id", "ranking"}`` per query, candidate ids as the benchmark names them
  (`idmr_jax.tasks.cir.benchmarks.base`); the metrics are a function of this file alone;
- the test server's submission files (unlabelled splits).

Candidate features are cached on disk (``config.cir.feature_cache``, default ``WORKDIR/eval/<bench>/cache``),
keyed by the image shards' sha256 and the model's identity (config, weights source and its file stamps), so a
second evaluation of the same model on the same gallery (another prompt set, the ``all`` run) reads them back.
Every process computes the same numbers; process 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging
from etils import epath

from idmr_jax.data.grain_io import list_shards
from idmr_jax.evaluation import outputs
from idmr_jax.tasks.cir import benchmarks, records
from idmr_jax.tasks.cir.benchmarks.base import Image, Query
from idmr_jax.tasks.cir.ranking import rank_queries

IMAGE_GLOB = "images-*.array_record"
QUERY_GLOB = "queries-*.array_record"


def folders(config) -> dict[str, str]:
    """Benchmark -> converted shards folder, for every benchmark this run evaluates."""
    c = config.cir
    if len(c.benchmarks) == 1 and config.data.val_dir:
        return {c.benchmarks[0]: config.data.val_dir}
    out = {b: c.val_dirs.get(b, "") for b in c.benchmarks}
    out = {b: d for b, d in out.items() if d}
    if not out:
        raise ValueError("no converted benchmark to evaluate: set --config.data.val_dir (one benchmark) or "
                         f"--config.cir.val_dirs.<bench> for some of {list(c.benchmarks)}")
    return out


def as_query(r: records.QueryRecord) -> Query:
    """The benchmark modules' view of a query record."""
    return Query(query_id=r.query_id, reference=r.reference, text=r.text, targets=r.targets, group=r.group,
                 candidates=r.candidates, subset=r.subset, extra=r.extra_fields, source_index=r.source_index)


def as_image(r: records.ImageRecord) -> Image:
    """The benchmark modules' view of an image record (no path: the bytes are in the record)."""
    return Image(key=r.key, image_id=r.image_id, path="", group=r.group, crop=r.crop)


def _model_identity(config) -> dict:
    init = config.model.init
    stamp = None
    if init.path and os.path.exists(init.path):
        st = os.stat(init.path)
        stamp = [st.st_size, st.st_mtime_ns]
        if init.format == "workdir":
            from idmr_jax.train.workdir import find_checkpoint

            stamp.append(str(find_checkpoint(init.path)[0]))
    return {"model": config.model.to_dict(), "precision": config.get("precision"), "seed": config.seed,
            "family": config.cir.family, "stamp": stamp, "data": {k: config.data.get(k) for k in
                                                                   ("image_size", "pad_ratio", "tokenizer")}}


def shard_digests(shards: list[str]) -> list[str]:
    """The sha256 of each shard: from the folder's ``manifest.json`` (written by the converter, which hashed them),
    so a real gallery's gigabytes are not read a second time just to name a cache entry; hashed here for a shard
    the manifest does not list."""
    listed = {}
    manifest = epath.Path(shards[0]).parent / "manifest.json" if shards else None
    if manifest is not None and manifest.exists():
        for entries in json.loads(manifest.read_text()).get("shards", {}).values():
            listed.update({e["file"]: e["sha256"] for e in entries})
    return [listed.get(epath.Path(p).name) or hashlib.sha256(epath.Path(p).read_bytes()).hexdigest() for p in shards]


def candidate_features(encoder, images: list[records.ImageRecord], shards: list[str], config, cache_dir) -> np.ndarray:
    """The encoder's features of every image, read from the on-disk cache when this model already encoded these
    shards (see the module docstring); ``config.cir.feature_cache == "none"`` turns the cache off."""
    if config.cir.feature_cache == "none":
        return encoder.candidates(images)
    key = json.dumps({"shards": shard_digests(shards), "model": _model_identity(config)}, sort_keys=True,
                     default=str)
    path = epath.Path(cache_dir) / f"candidates-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"
    if path.exists():
        logging.info("candidate features from %s", path)
        with path.open("rb") as f:
            return np.load(f)
    feats = encoder.candidates(images)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / (path.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, feats)
        tmp.rename(path)
    return feats


def make_encoder(task, model, benchmark: str):
    """The family's CIR encoder (`idmr_jax.tasks.cir.encoders`)."""
    from idmr_jax.tasks.cir import encoders

    if task.config.cir.family == "qformer":
        return encoders.QFormerEncoder(model, task.family)
    return encoders.MllmEncoder(model, task.family, benchmark, task.config.cir.prompts)


def evaluate_benchmark(task, model, benchmark: str, folder: str, workdir) -> dict:
    """One benchmark's evaluation (see the module docstring); returns its metrics ({} for an unlabelled split)."""
    module = benchmarks.get(benchmark)
    image_shards, query_shards = list_shards(folder, IMAGE_GLOB), list_shards(folder, QUERY_GLOB)
    images, queries = records.read_images(image_shards), records.read_queries(query_shards)
    if not queries:
        raise ValueError(f"{folder}: no query records")
    found = {(q.benchmark, q.split) for q in queries}
    if {b for b, _ in found} != {benchmark}:
        raise ValueError(f"{folder}: holds {sorted(found)}, not {benchmark!r} (config.cir.benchmarks)")
    split = queries[0].split
    encoder = make_encoder(task, model, benchmark)
    cache = task.config.cir.feature_cache or os.fspath(outputs.eval_dir(workdir, benchmark) / "cache")
    image_feats = candidate_features(encoder, images, image_shards, task.config, cache)
    query_feats = encoder.queries(queries, images)
    ranked = rank_queries(queries, images, query_feats, image_feats)
    by_key = {img.key: as_image(img) for img in images}
    views = [as_query(q) for q in queries]
    lines = {q.query_id: module.output_ranking(q, r, by_key) for q, r in zip(views, ranked)}
    rankings = [{"query_id": qid, "ranking": r} for qid, r in lines.items()]
    metrics = module.compute_metrics(views, lines) if split in module.LABELLED_SPLITS else {}
    if jax.process_index() == 0:
        outputs.write_rankings(workdir, rankings, subdir=benchmark)
        if split in module.LABELLED_SPLITS:
            outputs.write_metrics(workdir, metrics, subdir=benchmark)
        else:
            out = outputs.eval_dir(workdir, benchmark)
            for name, obj in module.submission_files(views, lines).items():
                (out / name).write_text(json.dumps(obj) + "\n")
                print(f"{benchmark}/{split}: submission file {out / name}")
    print(f"{benchmark}/{split}: {len(queries)} queries, {len(images)} images")
    return metrics


def evaluate_all(task, model, workdir) -> dict:
    """Every benchmark this run evaluates; returns their metrics in one flat dict (keys carry the benchmark) and
    prints the zero-shot table (`idmr_jax.tasks.cir.table`)."""
    from idmr_jax.tasks.cir.table import model_name, zero_shot_table

    results = {}
    for benchmark, folder in folders(task.config).items():
        results.update(evaluate_benchmark(task, model, benchmark, folder, workdir))
    name = model_name(task.config)
    if jax.process_index() == 0:
        (outputs.eval_dir(workdir) / "model.json").write_text(json.dumps({"name": name}) + "\n")
        if results:
            print("\nzero-shot results\n" + zero_shot_table({name: results}))
    return results
