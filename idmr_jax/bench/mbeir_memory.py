"""``mbeir_memory``: host memory per candidate of the M-BEIR evaluation, streamed against another implementation.

    python -m idmr_jax.bench mbeir_memory [--sizes=2000,8000] [--image-side=320] [--queries=16]
        [--before=OLD_EVALUATE.py] [--config=configs/mbeir.py:tiny] [--out=F.json]

Per size, a synthetic converted pool (``candidates-*`` shards of 1,000 image candidates each, JPEGs of
``--image-side`` x 3/4 of it, ~28 KB at 320; text queries of one key) is evaluated with the tiny random embedder,
each evaluation in a fresh process so that peaks do not mix. Measured around `evaluate_mbeir` alone (the model is
built before): the growth of peak resident memory (VmHWM, reset when it starts) over the resident memory at its
start. The growth per candidate is the slope between the two largest sizes, so the constant costs (compilation,
one block of pixels, the queries) cancel.

``--before`` names a copy of an older ``idmr_jax/tasks/universal/evaluate.py`` (e.g. ``git show
COMMIT:idmr_jax/tasks/universal/evaluate.py > /tmp/evaluate_before.py``); it runs in place of today's module, with
today's encoder, side by side in the same run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from idmr_jax.bench import common

MODULE = "idmr_jax.tasks.universal.evaluate"
PER_SHARD = 1000
POOL = "synthetic_pool"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="2000,8000", help="candidate pool sizes (at least two)")
    p.add_argument("--image-side", type=int, default=320, help="image width in pixels (height: 3/4 of it)")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--before", default="", help="an older evaluate.py to measure next to today's")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "mbeir.py") + ":tiny")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: measure one evaluation
    p.add_argument("--pool-dir", default="", help=argparse.SUPPRESS)


def synthetic_jpeg(width: int, seed: int) -> bytes:
    """A JPEG of a colour gradient with noise (``width`` x 3/4 of it): photo-like in size, distinct per seed."""
    from PIL import Image

    height = width * 3 // 4
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    noise = np.random.default_rng(seed).integers(-32, 32, base.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=85)
    return out.getvalue()


def write_pool(folder: str, num_candidates: int, *, image_side: int = 320, num_queries: int = 16,
               text_every: int = 0) -> dict:
    """Converted M-BEIR-style shards in `folder`: `num_candidates` candidates of one local pool (every
    `text_every`-th one text-only when > 0, the rest image-only), 1,000 per shard, and `num_queries` text queries of
    ``mscoco_task0`` ranked against that pool. Returns the counts and the image bytes written."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from idmr_jax.data.shards import WRITER_OPTIONS, shard_name
    from idmr_jax.tasks.universal import records

    os.makedirs(folder, exist_ok=True)
    images = [synthetic_jpeg(image_side, seed) for seed in range(16)]  # a copy per record once decoded anyway
    shards = max(1, -(-num_candidates // PER_SHARD))
    image_bytes = 0
    for s in range(shards):
        writer = ArrayRecordWriter(os.path.join(folder, shard_name("candidates", s, shards) + ".array_record"),
                                   WRITER_OPTIONS)
        for key in range(s * PER_SHARD, min(num_candidates, (s + 1) * PER_SHARD)):
            text_only = text_every > 0 and key % text_every == text_every - 1
            image = None if text_only else images[key % len(images)]
            image_bytes += len(image or b"")
            writer.write(records.encode_candidate(records.CandidateRecord(
                did=f"9:{key}", text=f"candidate {key}" if text_only else None, image=image,
                modality="text" if text_only else "image", source_index=key,
                extra=json.dumps({"pools": [POOL]}))))
        writer.close()
    writer = ArrayRecordWriter(os.path.join(folder, shard_name("queries", 0, 1) + ".array_record"), WRITER_OPTIONS)
    for i in range(num_queries):
        writer.write(records.encode_query(records.QueryRecord(
            qid=f"9:q{i}", text=f"query {i}", image=None, modality="text", instruction_set=("Find the image.",),
            task_id=0, dataset_id=9, positives=(f"9:{i % num_candidates}",), negatives=(), source_index=i,
            extra=json.dumps({"key": "mscoco_task0", "pool": POOL}))))
    writer.close()
    return {"candidates": num_candidates, "queries": num_queries, "image_bytes": image_bytes}


def _evaluate_module(before: str):
    """Today's evaluation module, or the file `before` loaded in its place (the task imports it when evaluating)."""
    if not before:
        return importlib.import_module(MODULE)
    spec = importlib.util.spec_from_file_location(MODULE, before)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return module


def measure_once(variant: str, before: str, pool_dir: str, config_name: str) -> dict:
    """Evaluates the pool in `pool_dir` once (in this process) and measures `evaluate_mbeir` alone."""
    from idmr_jax import tasks
    from idmr_jax.bench import configs
    from idmr_jax.train import trainer

    module = _evaluate_module(before if variant == "before" else "")
    inner, stats = module.evaluate_mbeir, {}

    def measured(task, model, workdir):
        gc.collect()
        common.reset_host_peak()
        stats["rss_start_bytes"] = common.host_memory()["rss_bytes"]
        t0 = time.perf_counter()
        metrics = inner(task, model, workdir)
        stats["seconds"] = time.perf_counter() - t0
        stats["peak_rss_bytes"] = common.host_memory()["peak_rss_bytes"]
        stats["embedding_bytes"] = 4 * int(task.config.model.text.hidden_size)  # float32 [D]: LM-sized pooling
        return metrics

    module.evaluate_mbeir = measured
    config = configs.from_file(config_name)
    config.data.val_dir = pool_dir
    with tempfile.TemporaryDirectory() as workdir:
        metrics = trainer.evaluate_only(tasks.build(config), workdir)
        rankings = (Path(workdir) / "eval" / "mbeir" / "rankings.jsonl").read_bytes()
    stats["growth_bytes"] = stats["peak_rss_bytes"] - stats["rss_start_bytes"]
    return {"variant": variant, "headline": metrics["mbeir/avg/headline"],
            "rankings_sha256": hashlib.sha256(rankings).hexdigest(), **stats}


def _child(args, variant: str, pool_dir: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "idmr_jax.bench", "mbeir_memory", "--child", variant, "--pool-dir", pool_dir,
           "--before", args.before, "--config", args.config, "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    if done.returncode:
        raise RuntimeError(f"{variant} on {pool_dir} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(Path(out).read_text())


def run(args: argparse.Namespace) -> dict:
    if args.child:
        return measure_once(args.child, args.before, args.pool_dir, args.config)
    sizes = sorted(common.parse_ints(args.sizes))
    if len(sizes) < 2:
        raise ValueError("--sizes needs at least two pool sizes (the growth per candidate is a slope)")
    variants = (["before"] if args.before else []) + ["after"]
    result = {"suite": "mbeir_memory", "machine": common.machine_info(),
              "setup": {"sizes": sizes, "image_side": args.image_side, "queries": args.queries,
                        "config": args.config, "before": args.before or None}, "pools": {}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            result["pools"][str(n)] = write_pool(os.path.join(tmp, str(n)), n, image_side=args.image_side,
                                                 num_queries=args.queries)
        for n in sizes:  # the variants alternate, so a change in the machine's load hits both alike
            for variant in variants:
                row = _child(args, variant, os.path.join(tmp, str(n)), os.path.join(tmp, f"{variant}-{n}.json"))
                result["runs"].append({"candidates": n, **row})
    small, large = sizes[-2], sizes[-1]
    by = {(r["variant"], r["candidates"]): r for r in result["runs"]}
    result["per_candidate"] = {
        v: {"growth_bytes": (by[v, large]["growth_bytes"] - by[v, small]["growth_bytes"]) / (large - small),
            "image_bytes": result["pools"][str(large)]["image_bytes"] / large,
            "embedding_bytes": by[v, large]["embedding_bytes"]} for v in variants}
    # the variants must agree on what they compute, or their memory is not comparable
    result["same_rankings"] = all(by[v, n]["rankings_sha256"] == by["after", n]["rankings_sha256"]
                                  for v in variants for n in sizes)
    return result
