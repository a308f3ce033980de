"""The universal task's laptop demo data (InstructCIR's two stages on the packaged photos), built once and cached.

For ``config.data.source == "demo"`` (`idmr_jax.tasks.prepare_data` calls `prepare`): the demo benchmark
(`idmr_jax.data.demo_bench`, deterministic from ``config.data.demo_seed`` and ``demo_size``) is built or reused, and
its images get template captions (the instance's category, its position and size, the context; read from
``demo_meta.json``; the template and phrases drawn from a seeded stream per image). The training data go through
the real InstructCIR path: jsonl files in the converter's formats are written first, then converted by
`idmr_jax.tasks.universal.instructcir_data.convert_pairs`:

- stage 1 (``config.data.demo_stage == "captions"``): one caption pair per TRAIN image;
- stage 2 (``"instructions"``): one triplet per TRAIN quadruple: the reference image, the quadruple's
  modification text as the instruction, the target's caption as the modified caption and the reference's caption
  as the original caption (the hard negative);
- ``"cir_pairs"`` (the retrieve-mine-rerank loop of ``configs/rerank.py:demo``): one pair per TRAIN quadruple,
  the task the val shards measure: the reference image with the modification text -> the target image, no
  negatives of its own; ``extra``: the target's ``instance``, ``instance_positives`` (every TRAIN image of that
  instance: never mined as a negative) and the ``reference``;
- val (every stage): the VAL quadruples as zero-shot CIR shards of the universal query / candidate kinds:
  ``queries-*`` (reference image + modification text, positives = the target, ``extra``: ``key`` and ``pool``
  "demo_cir", ``reference``, ``instance`` and ``instance_positives``: every val image of the same instance) and
  ``candidates-*`` (every val image, ``extra.pools`` = ["demo_cir"]), evaluated by
  `idmr_jax.tasks.universal.demo_eval`.

Layout under ``config.data.demo_cache`` (default ``~/.cache/idmr_jax/universal_demo``)::

    <size>-seed<seed>/benchmark/            the demo benchmark (OACIRR layout + demo_meta.json)
    <size>-seed<seed>/sources/              captions.train.jsonl, triplets.train.jsonl
    <size>-seed<seed>/stage1_captions/      train-*.array_record + manifest.json
    <size>-seed<seed>/stage2_instructions/  train-*.array_record + manifest.json
    <size>-seed<seed>/cir_pairs/            train-*.array_record + manifest.json
    <size>-seed<seed>/val/                  queries-*, candidates-* + manifest.json

Everything is a function of (seed, size) and reused when already built (unchanged shards are not rewritten).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import ml_collections
import numpy as np

from idmr_jax.paths import cache_dir
from idmr_jax.data import image_files
from idmr_jax.data.demo_bench import builder, texts
from idmr_jax.data.shards import (WRITER_OPTIONS, ShardPlan, json_digest, open_shard_state, shard_name,
                                  write_json_atomic, write_shards)
from idmr_jax.tasks.universal import records
from idmr_jax.tasks.universal.demo_eval import CIR_KEY
from idmr_jax.tasks.universal.instructcir_data import convert_pairs

STAGES = {"captions": "stage1_captions", "instructions": "stage2_instructions", "cir_pairs": "cir_pairs"}
# Caption templates. {a_obj}: the category with its article, {ctx}: the context's description, {where}: position
# phrase, {size}: size phrase (the phrases of `idmr_jax.data.demo_bench.texts`, so captions and modification texts
# speak alike).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "A photo of {a_obj} {where}, {size}, in front of {ctx}.",
    "{a_obj} {where} against {ctx}, {size}.",
    "{ctx} with {a_obj} {where}, {size}.",
    "An image of {ctx}; {a_obj} sits {where}, {size}.",
)
_CAPTION_STREAM = 101  # the seeded stream of the captions (the benchmark's own stages use 0-4)
# CIR in M-BEIR's task numbering ((image, text) -> image); the demo has no dataset id of its own.
CIR_TASK_ID = 7
VAL_TOOL = "idmr_jax.tasks.universal.demo"

__all__ = ["CAPTION_TEMPLATES", "CIR_KEY", "STAGES", "build_demo_data", "demo_dirs", "image_captions", "prepare"]


def default_cache() -> str:
    """The demo cache when ``config.data.demo_cache`` is empty: ``~/.cache/idmr_jax/universal_demo``."""
    return cache_dir("universal_demo")


def demo_dirs(cache: str, seed: int, size: str) -> dict[str, str]:
    """The folders of one build: ``root``, ``benchmark``, ``sources``, ``val`` and one per stage (`STAGES`)."""
    root = os.path.join(cache, f"{size}-seed{seed}")
    dirs = {"root": root, "benchmark": os.path.join(root, "benchmark"), "sources": os.path.join(root, "sources"),
            "val": os.path.join(root, "val")}
    dirs.update({stage: os.path.join(root, folder) for stage, folder in STAGES.items()})
    return dirs


def image_captions(meta: dict, seed: int) -> dict[str, str]:
    """A template caption for every image of ``demo_meta.json`` (its category, position, size and context),
    deterministic in (seed, the image's position in the meta file)."""
    out = {}
    for i, (name, im) in enumerate(meta["images"].items()):
        rng = np.random.default_rng([seed, _CAPTION_STREAM, i])
        where = texts.POSITION_PHRASES[tuple(im["position"])]
        size = texts.SIZE_PHRASES[im["size"]]
        template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
        category = meta["instances"][im["instance"]]["category"]
        caption = template.format(a_obj=f"{'an' if category[0] in 'aeiou' else 'a'} {category}",
                                  ctx=meta["contexts"][im["context"]]["description"],
                                  where=where[int(rng.integers(len(where)))], size=size[int(rng.integers(len(size)))])
        out[name] = caption[0].upper() + caption[1:]
    return out


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_if_changed(path: str, text: str) -> None:
    """Writes `text` atomically unless the file already holds it (a reused build touches nothing)."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def _bench_files(bench: str, side: str) -> tuple[dict, dict[str, str], list[dict]]:
    """(demo_meta, split map name -> image path, quadruples) of one split of the benchmark."""
    ann = os.path.join(bench, builder.ANNOTATION_ROOT)
    return (_read_json(os.path.join(bench, builder.META)),
            _read_json(os.path.join(ann, "image_splits", f"split.{side}.json")),
            _read_json(os.path.join(ann, "quadruple_captions", f"caption_full.{side}.json")))


def _write_sources(bench: str, sources: str, seed: int) -> dict[str, str]:
    """The stage-1 and stage-2 jsonl files of the TRAIN split -> {stage: path}."""
    meta, paths, quadruples = _bench_files(bench, "train")
    captions = image_captions(meta, seed)
    os.makedirs(sources, exist_ok=True)
    files = {"captions": os.path.join(sources, "captions.train.jsonl"),
             "instructions": os.path.join(sources, "triplets.train.jsonl")}
    _write_if_changed(files["captions"], _jsonl([{"id": name, "image": rel, "caption": captions[name]}
                                                 for name, rel in paths.items()]))
    _write_if_changed(files["instructions"], _jsonl([
        {"id": f"train:{q}", "image": paths[row["reference"]], "instruction": row["modification_text_mllm"],
         "modified_caption": captions[row["target"]], "original_caption": captions[row["reference"]]}
        for q, row in enumerate(quadruples)]))
    return files


def _produce_val(task: dict) -> Iterator[bytes]:
    """Worker entry point of the val shards: the encoded query or candidate records of one shard."""
    root = task["root"]
    for item in task["items"]:
        fields = dict(item)
        image, _ = image_files.read_image_file(os.path.join(root, fields.pop("image_path")), root)
        if task["kind"] == records.QUERY_KIND:
            yield records.encode_query(records.QueryRecord(
                image=image, modality="image,text", instruction_set=(), task_id=CIR_TASK_ID, dataset_id=0,
                negatives=(), **fields))
        else:
            yield records.encode_candidate(records.CandidateRecord(image=image, text=None, modality="image",
                                                                   **fields))


def _write_val(bench: str, out: str) -> dict:
    """The zero-shot CIR shards of the VAL quadruples (module docstring) -> their manifest."""
    meta, paths, quadruples = _bench_files(bench, "val")
    instance_of = {name: meta["images"][name]["instance"] for name in paths}
    by_instance: dict[str, list[str]] = {}
    for name, inst in instance_of.items():
        by_instance.setdefault(inst, []).append(name)
    queries = [dict(qid=f"{CIR_KEY}:{q}", text=row["modification_text_mllm"], image_path=paths[row["reference"]],
                    positives=(row["target"],), source_index=q,
                    extra=json.dumps({"key": CIR_KEY, "pool": CIR_KEY, "reference": row["reference"],
                                      "instance": instance_of[row["target"]],
                                      "instance_positives": by_instance[instance_of[row["target"]]]}, sort_keys=True))
               for q, row in enumerate(quadruples)]
    candidates = [dict(did=name, image_path=rel, source_index=i,
                       extra=json.dumps({"pools": [CIR_KEY], "instance": instance_of[name]}, sort_keys=True))
                  for i, (name, rel) in enumerate(paths.items())]
    build = _read_json(os.path.join(bench, builder.BUILD_INFO))["content_sha256"]
    image_root = os.path.join(bench, builder.IMAGE_ROOT)
    plans = []
    for prefix, kind, items in (("queries", records.QUERY_KIND, queries),
                                ("candidates", records.CANDIDATE_KIND, candidates)):
        task = {"kind": kind, "items": items}
        digest = json_digest({"schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS, "build": build, **task})
        plans.append(ShardPlan(shard_name(prefix, 0, 1), digest, {**task, "root": image_root}))
    os.makedirs(out, exist_ok=True)
    state = open_shard_state(out, {"tool": VAL_TOOL, "split": "val"})
    infos, _, _ = write_shards(out, plans, _produce_val, state)
    manifest = {"tool": {"name": VAL_TOOL}, "record_schema_version": records.SCHEMA_VERSION,
                "benchmark_content_sha256": build,
                "counts": {"queries": len(queries), "candidates": len(candidates), "instances": len(by_instance)},
                "shards": {"queries": [dataclasses.asdict(infos[0])], "candidates": [dataclasses.asdict(infos[1])]}}
    write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _produce_cir_pairs(task: dict) -> Iterator[bytes]:
    """Worker entry point of the ``cir_pairs`` shard: one encoded pair per TRAIN quadruple."""
    root = task["root"]

    def image(rel: str) -> bytes:
        return image_files.read_image_file(os.path.join(root, rel), root)[0]

    for item in task["items"]:
        query = records.Side(id=item["qid"], text=item["text"], image=image(item["reference_path"]),
                             modality="image,text")
        positive = records.Side(id=item["target"], text=None, image=image(item["target_path"]), modality="image")
        yield records.encode_pair(records.TrainingPair(
            pair_id=item["qid"], query=query, instruction_set=(), task_id=CIR_TASK_ID, dataset_id=0,
            positive=positive, negatives=(), source_index=item["source_index"], extra=item["extra"]))


def _write_cir_pairs(bench: str, out: str) -> dict:
    """The ``cir_pairs`` training shard of the TRAIN quadruples (module docstring) -> its manifest."""
    meta, paths, quadruples = _bench_files(bench, "train")
    instance_of = {name: meta["images"][name]["instance"] for name in paths}
    by_instance: dict[str, list[str]] = {}
    for name, inst in instance_of.items():
        by_instance.setdefault(inst, []).append(name)
    items = [dict(qid=f"{CIR_KEY}:train:{q}", text=row["modification_text_mllm"], target=row["target"],
                  reference_path=paths[row["reference"]], target_path=paths[row["target"]], source_index=q,
                  extra=json.dumps({"instance": instance_of[row["target"]], "reference": row["reference"],
                                    "instance_positives": by_instance[instance_of[row["target"]]]}, sort_keys=True))
             for q, row in enumerate(quadruples)]
    build = _read_json(os.path.join(bench, builder.BUILD_INFO))["content_sha256"]
    task = {"items": items}
    digest = json_digest({"schema": records.SCHEMA_VERSION, "writer": WRITER_OPTIONS, "build": build, **task})
    plan = ShardPlan(shard_name("train", 0, 1), digest, {**task, "root": os.path.join(bench, builder.IMAGE_ROOT)})
    os.makedirs(out, exist_ok=True)
    state = open_shard_state(out, {"tool": VAL_TOOL, "split": "cir_pairs"})
    infos, _, _ = write_shards(out, [plan], _produce_cir_pairs, state)
    manifest = {"tool": {"name": VAL_TOOL}, "record_schema_version": records.SCHEMA_VERSION,
                "benchmark_content_sha256": build, "counts": {"pairs": len(items), "instances": len(by_instance)},
                "shards": {"train": [dataclasses.asdict(infos[0])]}}
    write_json_atomic(os.path.join(out, "manifest.json"), manifest)
    return manifest


def build_demo_data(cache: str, seed: int, size: str, stage: str) -> tuple[str, str]:
    """Builds (or reuses) the benchmark, the `stage`'s training shards and the val shards -> (train_dir, val_dir)."""
    if stage not in STAGES:
        raise ValueError(f"config.data.demo_stage = {stage!r}: use one of {sorted(STAGES)}")
    dirs = demo_dirs(cache, seed, size)
    bench = os.fspath(builder.build_demo_benchmark(dirs["benchmark"], seed=seed, size=size))
    if stage == "cir_pairs":
        _write_cir_pairs(bench, dirs[stage])
    else:
        sources = _write_sources(bench, dirs["sources"], seed)
        fmt = "captions" if stage == "captions" else "triplets"
        convert_pairs(fmt, sources[stage], os.path.join(bench, builder.IMAGE_ROOT), dirs[stage], strict=True)
    _write_val(bench, dirs["val"])
    return dirs[stage], dirs["val"]


def prepare(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """Builds (or reuses) the demo data of ``config.data.demo_stage`` on process 0 only -> (train_dir, val_dir).

    Every process gets the paths; the others must wait for process 0 before reading them (`prepare_data` does)."""
    import jax

    d = config.data
    stage = d.get("demo_stage", "captions")
    cache = d.demo_cache or default_cache()
    if stage not in STAGES:
        raise ValueError(f"config.data.demo_stage = {stage!r}: use one of {sorted(STAGES)}")
    if jax.process_index() == 0:
        return build_demo_data(cache, d.demo_seed, d.demo_size, stage)
    dirs = demo_dirs(cache, d.demo_seed, d.demo_size)
    return dirs[stage], dirs["val"]
