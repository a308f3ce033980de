"""M-BEIR training pairs: converted shards of the tiny release (tests/mbeir_fixtures.py, through the real converter)
-> pair shards: counts, each pair's sides against its query and candidate records, negatives resolved in the
query's order, instructions carried, missing positives and negatives reported by name (``--strict`` exits 2), the
did index, and a rerun reusing finished shards."""

import dataclasses
import json
import os

import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from data_prep import mbeir_pairs as pairs_cli
from idmr_jax.data.shards import WRITER_OPTIONS, ConversionError, file_sha256
from idmr_jax.tasks.universal import records
from idmr_jax.tasks.universal.mbeir_convert import convert
from idmr_jax.tasks.universal.mbeir_pairs import build_candidate_index, convert_pairs, read_converted
from mbeir_fixtures import INSTRUCTIONS, KEYS, write_mbeir

QUERY_ORDER = ["9:1", "9:2", "9:3", "2:1", "2:2", "7:1", "7:2", "5:1", "5:2", "5:3"]  # key by key, file order


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture's test split converted against its union pool: (folder, write_mbeir's info)."""
    tmp = tmp_path_factory.mktemp("mbeir")
    info = write_mbeir(str(tmp / "release"))
    convert(str(tmp / "release"), info["split"], str(tmp / "shards"), keys=list(KEYS), pool="global")
    return str(tmp / "shards"), info


def _side(c: records.CandidateRecord) -> records.Side:
    return records.Side(id=c.did, text=c.text, image=c.image, modality=c.modality)


def _prompts(dataset_id: int, query_modality: str, cand_modality: str) -> tuple[str, ...]:
    row = [r for r in INSTRUCTIONS if (r[3], r[0], r[1]) == (dataset_id, query_modality, cand_modality)]
    return tuple(p for p in row[0][4] if p)


def test_pairs_of_a_converted_split(converted, tmp_path):
    shards, info = converted
    manifest = convert_pairs(shards, str(tmp_path / "pairs"), shard_size=4)
    c = manifest["counts"]
    assert (c["pairs"], c["queries"], c["candidates"], c["hard_negatives"], c["skipped"]) == (10, 10, 14, 1, 0)
    assert c["pairs_by_key"] == {"mscoco_task0": 3, "webqa_task1": 2, "fashioniq_task7": 2, "oven_task6": 3}
    assert [s["records"] for s in manifest["shards"]["train"]] == [4, 3, 3]
    assert [s["file"] for s in manifest["shards"]["train"]][0] == "train-00000-of-00003.array_record"
    with open(os.path.join(shards, "manifest.json")) as f:
        converted_manifest = json.load(f)
    assert manifest["sources"] == {s["file"]: s["sha256"] for kind in ("queries", "candidates")
                                   for s in converted_manifest["shards"][kind]}
    for entry in manifest["shards"]["train"]:
        assert file_sha256(tmp_path / "pairs" / entry["file"]) == entry["sha256"]

    pairs = records.read_pairs(str(tmp_path / "pairs" / "train-*.array_record"))
    queries = {q.qid: q for q in records.read_queries(os.path.join(shards, "queries-*.array_record"))}
    cands = {c.did: c for c in records.read_candidates(os.path.join(shards, "candidates-*.array_record"))}
    assert [p.pair_id for p in pairs] == QUERY_ORDER
    for key, p in enumerate(pairs):
        q = queries[p.pair_id]
        assert p.query == records.Side(id=q.qid, text=q.text, image=q.image, modality=q.modality)
        assert (p.instruction_set, p.task_id, p.dataset_id, p.source_index) == (
            q.instruction_set, q.task_id, q.dataset_id, q.source_index)
        assert p.positive == _side(cands[info["positives"][p.pair_id][0]])
        extra = json.loads(p.extra)
        assert extra["other_positives"] == info["positives"][p.pair_id][1:]
        assert extra["query_shard_key"] == key and extra["key"] == q.extra_fields["key"]
    by_id = {p.pair_id: p for p in pairs}
    assert by_id["2:1"].negatives == (records.Side("2:203", "The tower is 330 m tall.", None, "text"),)
    assert by_id["2:1"].instruction_set == _prompts(2, "text", "text") and len(by_id["2:1"].instruction_set) == 4
    assert by_id["7:1"].instruction_set == _prompts(7, "image,text", "image") and by_id["7:1"].query.image
    assert by_id["7:1"].positive.image == cands["7:301"].image and by_id["7:1"].positive.modality == "image"
    assert json.loads(by_id["5:2"].extra)["other_positives"] == ["6:501"]  # the InfoSeek positive, kept aside
    assert by_id["5:3"].positive.text == "Airbus A380"  # a positive of the other dataset, in the union pool


def test_candidate_index_gives_global_keys(converted):
    shards, info = converted
    index = build_candidate_index(read_converted(shards).candidates)
    assert len(index) == 14
    for key, did in enumerate(info["union_candidates"]):  # the union pool, sorted by did, is the shards' order
        assert index.key(did) == key
    assert index.key("9:999") is None and index.key("9:10") is None and index.key("9:1011") is None


def _write_shards(folder, base: dict, queries, candidates, junk: bytes | None = None) -> None:
    """Converted shards of the given records, one shard each, with `base`'s manifest pointing at them; `junk` is
    written as a last, undecodable candidate record."""
    os.makedirs(folder)
    entries = {}
    for kind, rows, encode in (("queries", queries, records.encode_query),
                               ("candidates", candidates, records.encode_candidate)):
        name = f"{kind}-00000-of-00001.array_record"
        writer = ArrayRecordWriter(os.path.join(folder, name), WRITER_OPTIONS)
        for r in rows:
            writer.write(encode(r))
        if junk is not None and kind == "candidates":
            writer.write(junk)
        writer.close()
        path = os.path.join(folder, name)
        entries[kind] = [{"file": name, "records": len(rows), "sha256": file_sha256(path),
                          "bytes": os.path.getsize(path)}]
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({**base, "shards": entries}, f)


def test_missing_positive_and_negatives_reported_by_name(converted, tmp_path, capsys):
    shards, _ = converted
    with open(os.path.join(shards, "manifest.json")) as f:
        base = json.load(f)
    queries = records.read_queries(os.path.join(shards, "queries-*.array_record"))
    negatives = {"2:1": ("2:777", "2:202", "2:201", "2:203", "2:202"), "2:2": ("2:203", "2:201")}
    queries = [dataclasses.replace(q, negatives=negatives.get(q.qid, q.negatives)) for q in queries]
    cands = [c for c in records.read_candidates(os.path.join(shards, "candidates-*.array_record")) if c.did != "9:101"]
    _write_shards(tmp_path / "bad", base, queries, cands)

    manifest = convert_pairs(str(tmp_path / "bad"), str(tmp_path / "pairs"))
    file = "queries-00000-of-00001.array_record"
    got = [(s["file"], s["index"], s["name"], s["field"], s["code"], s["action"]) for s in manifest["skipped"]]
    assert got == [(file, 0, "9:1", "positives[0]", "unknown_name", "record_skipped"),
                   (file, 3, "2:1", "negatives[0]", "unknown_name", "entry_ignored"),
                   (file, 3, "2:1", "negatives[2]", "is_positive", "entry_ignored"),
                   (file, 3, "2:1", "negatives[4]", "duplicate_name", "entry_ignored")]
    assert (manifest["counts"]["pairs"], manifest["counts"]["hard_negatives"]) == (9, 4)
    by_id = {p.pair_id: p for p in records.read_pairs(str(tmp_path / "pairs" / "train-*.array_record"))}
    assert "9:1" not in by_id
    assert [n.id for n in by_id["2:1"].negatives] == ["2:202", "2:203"]  # the query's order, not the pool's
    assert [n.text for n in by_id["2:2"].negatives] == ["The tower is 330 m tall.", "Gustave Eiffel built it."]

    args = ["--shards", str(tmp_path / "bad"), "--out"]
    assert pairs_cli.main(args + [str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict: 4 bad input entries" in err and "('9:1'), field 'positives[0]'" in err
    assert "('2:1'), field 'negatives[0]'" in err and not (tmp_path / "strict").exists()
    assert pairs_cli.main(args + [str(tmp_path / "cli")]) == 0


def test_rerun_reuses_finished_shards(converted, tmp_path):
    shards, _ = converted
    out = tmp_path / "pairs"
    first = convert_pairs(shards, str(out), shard_size=4)
    files = [s["file"] for s in first["shards"]["train"]]
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in files}
    assert convert_pairs(shards, str(out), shard_size=4) == first
    assert {f: os.stat(out / f).st_mtime_ns for f in files} == mtimes  # nothing rewritten
    os.remove(out / files[1])
    assert convert_pairs(shards, str(out), shard_size=4) == first  # the lost shard again, byte for byte
    assert [os.stat(out / f).st_mtime_ns == mtimes[f] for f in files] == [True, False, True]


def test_bad_input_folders(converted, tmp_path):
    shards, _ = converted
    with pytest.raises(ConversionError, match="manifest"):
        convert_pairs(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ConversionError, match="another folder"):
        convert_pairs(shards, shards)
    with open(os.path.join(shards, "manifest.json")) as f:
        base = json.load(f)
    queries = records.read_queries(os.path.join(shards, "queries-*.array_record"))
    cands = records.read_candidates(os.path.join(shards, "candidates-*.array_record"))
    _write_shards(tmp_path / "junk", base, queries, cands, junk=b"\x93not a map")
    with pytest.raises(ConversionError, match=r"candidates-00000-of-00001\.array_record: record 14: not a msgpack"):
        convert_pairs(str(tmp_path / "junk"), str(tmp_path / "out"))
    with open(tmp_path / "junk" / "candidates-00000-of-00001.array_record", "ab") as f:
        f.write(b"x")  # no longer the size its manifest records
    with pytest.raises(ConversionError, match="bytes its manifest records"):
        convert_pairs(str(tmp_path / "junk"), str(tmp_path / "out"))


@pytest.mark.slow
def test_train_on_pairs_then_evaluate_on_the_local_pools(converted, tmp_path):
    """configs/mbeir.py:tiny,train end to end: the pairs (every modality mixture, hard negatives carried) train a tiny
    embedder whose vision tower trains under GradCache on 8 devices, then M-BEIR is evaluated on the local pools."""
    import numpy as np

    from configs import mbeir
    from idmr_jax import tasks
    from idmr_jax.train import trainer

    folder, info = converted
    pair_dir, local = tmp_path / "pairs", tmp_path / "local"
    convert_pairs(str(folder), str(pair_dir))
    convert(os.path.join(os.path.dirname(folder), "release"), info["split"], str(local), keys=list(KEYS),
            pool="local")
    config = mbeir.get_config("tiny,train")
    config.data.update(dict(train_dir=str(pair_dir), val_dir=str(local), batch_size=8, num_hard_negatives=1))
    config.train.update(dict(num_steps=2, checkpoint_every=2, log_every=1, async_checkpoints=False, progress=False))
    task = tasks.build(config)
    assert not task.vision_frozen and config.loss.gradcache_chunk == 1
    batch = next(task.train_iterator())
    assert batch["query_has_image"].any() and not batch["query_has_image"].all()  # a mixed batch
    assert batch["hn_ids"].shape[:2] == (8, 1)
    metrics = trainer.train_and_evaluate(task, str(tmp_path / "w"))
    assert "mbeir/avg/headline" in metrics and all(np.isfinite(v) for v in metrics.values())
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("split") == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
