"""MM-Embed's modality-aware hard-negative mining (`idmr_jax.tasks.universal.mining`) on a hand-built index: query
i's embedding is the unit vector e_i and each candidate's embedding holds its score for every query, so every
ranking below is chosen by hand (small integers: exact in the index's bfloat16)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from idmr_jax.data.shards import WRITER_OPTIONS, ConversionError
from idmr_jax.search import store
from idmr_jax.tasks.universal import mining, records
from idmr_jax.tasks.universal.pipeline import PairExample

MODALITY = {"t": "text", "i": "image", "it": "image,text"}
# did -> (modality, instance, scores for queries 0, 1, 2). Query 0 ranks t1 i1 i2 i3 i4 pos0 | t2 i5 i6 i7;
# query 1 ranks it1 t3 i7 i6 t4 i5 t1 i1 i2 i3 | i4 pos0 pos1 (its positive is outside the top 10);
# query 2 ranks i1 t3 tpos2 | t4 it1 t1 t2 ...
CANDIDATES = {
    "t1": ("t", None, (16, 10, 11)), "i1": ("i", "dog", (15, 9, 16)), "i2": ("i", None, (14, 8, 1)),
    "i3": ("i", "cat", (13, 7, 2)), "i4": ("i", None, (12, 6, 3)), "pos0": ("i", "cat", (11, 5, 4)),
    "t2": ("t", None, (10, 3, 10)), "i5": ("i", None, (9, 11, 5)), "i6": ("i", None, (8, 13, 6)),
    "i7": ("i", None, (7, 14, 7)), "pos1": ("i", None, (1, 4, 8)), "tpos2": ("t", None, (2, 2, 14)),
    "t3": ("t", None, (3, 15, 15)), "t4": ("t", None, (4, 12, 13)), "it1": ("it", None, (5, 16, 12)),
}
RULE = dict(k=10, num_above=2, num_near=1, window=3)
# The negatives the rule must choose, worked out by hand from the rankings above:
# pair 0: i1 (t1 is text: passed over), i2 is an other positive, i3 the pair's instance "cat": dropped, i4; then
#         in the 3 ranks below pos0 (t2 i5 i6): i5 (t2 is text).
# pair 1: its positive is outside the top 10: every image of the top 10 is above it: i7, i6; no near misses.
# pair 2: (text target) t3 above; below tpos2 within 3 ranks (t4 it1 t1): t4.
# pair 3: its positive "ghost" is not in the index: skipped, written with its own negatives.
EXPECTED = {"p0": ["i1", "i4", "i5"], "p1": ["i7", "i6"], "p2": ["t3", "t4"], "p3": []}


def _side(did: str, kind: str) -> records.Side:
    modality = MODALITY[kind]
    return records.Side(id=did, text=None if modality == "image" else f"text of {did}",
                        image=None if modality == "text" else f"image bytes of {did}".encode(), modality=modality)


def _write(path: str, payloads: list[bytes]) -> None:
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    for p in payloads:
        writer.write(p)
    writer.close()


def _pair(n: int, query: str, positive: records.Side, negatives=(), **extra) -> records.TrainingPair:
    return records.TrainingPair(pair_id=f"p{n}", query=_side(f"q{n}", query), instruction_set=(), task_id=0,
                                dataset_id=0, positive=positive, negatives=tuple(negatives), source_index=n,
                                extra=json.dumps(extra, sort_keys=True))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mining")
    cand_dir, train_dir = root / "candidates", root / "train"
    cand_dir.mkdir()
    train_dir.mkdir()
    dids = list(CANDIDATES)
    cands = []
    for i, did in enumerate(dids):
        kind, instance, _ = CANDIDATES[did]
        side = _side(did, kind)
        cands.append(records.CandidateRecord(did=did, text=side.text, image=side.image, modality=side.modality,
                                             source_index=i, extra=json.dumps({"instance": instance} if instance
                                                                              else {})))
    _write(str(cand_dir / "candidates-00000-of-00002.array_record"), [records.encode_candidate(c) for c in cands[:8]])
    _write(str(cand_dir / "candidates-00001-of-00002.array_record"), [records.encode_candidate(c) for c in cands[8:]])
    emb = np.array([CANDIDATES[d][2] for d in dids], np.float32)
    index = store.write_index(str(root / "index"), dids, [MODALITY[CANDIDATES[d][0]] for d in dids], emb,
                              block_rows=4, source={"kind": "shards", "path": str(cand_dir)},
                              model={"workdir": "W", "step": 7})
    pairs = [_pair(0, "t", _side("pos0", "i"), other_positives=["i2"], instance="cat"),
             _pair(1, "it", _side("pos1", "i"), [_side("t1", "t")]),
             _pair(2, "i", _side("tpos2", "t"), [_side("t4", "t"), _side("ownneg", "t")]),
             _pair(3, "t", _side("ghost", "i"), [_side("i1", "i")])]
    _write(str(train_dir / "train-00000-of-00002.array_record"), [records.encode_pair(p) for p in pairs[:2]])
    _write(str(train_dir / "train-00001-of-00002.array_record"), [records.encode_pair(p) for p in pairs[2:]])
    queries = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    return {"root": root, "index": index, "train": str(train_dir), "queries": queries, "pairs": pairs}


def _mine(data, out: str, **options):
    rule = mining.MiningRule(**{**RULE, **options})
    return mining.mine_shards(data["train"], data["index"], data["queries"], str(data["root"] / out), rule=rule)


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if not name.startswith(".")}


def test_the_rule_by_hand():
    dids = ["a", "T", "b", "P", "c", "U", "d", "e"]
    mods = ["image", "text", "image", "image", "text", "image", "image", "image"]
    kw = dict(positive="P", target_modality="image", window=3)
    # Above P: a, b (T is text); within 3 ranks below P (c U d): d, as U is marked a positive; e is out of the window.
    assert mining.mine_negatives(dids, mods, positives={"U"}, num_above=5, num_near=5, **kw) == ["a", "b", "d"]
    assert mining.mine_negatives(dids, mods, positives={"a"}, num_above=5, num_near=5, **kw) == ["b", "U", "d"]
    assert mining.mine_negatives(dids, mods, positives=set(), num_above=1, num_near=1, **kw) == ["a", "U"]
    assert mining.mine_negatives(dids, mods, positives=set(), num_above=0, num_near=2, **kw) == ["U", "d"]
    choice = mining.choose_negatives(dids, mods, positives=set(), num_above=9, num_near=0, **kw)
    assert (choice.positive_rank, choice.other_modality_above, choice.near) == (3, 1, ())
    # The positive outside the list: everything kept is above it, nothing is near.
    choice = mining.choose_negatives(dids, mods, positives=set(), num_above=9, num_near=9,
                                     **{**kw, "positive": "Z"})
    assert choice.above == ("a", "b", "P", "U", "d", "e") and choice.near == () and choice.positive_rank is None
    assert mining.mine_negatives(dids, mods, positives=set(), num_above=9, num_near=9,
                                 **{**kw, "target_modality": "text"}) == ["T", "c"]
    with pytest.raises(ValueError, match="num_near"):
        mining.MiningRule(num_near=-1)
    with pytest.raises(ValueError, match="negatives"):
        mining.MiningRule(negatives="merge")


def test_mined_shards_hold_the_expected_negatives_and_manifest(data):
    manifest = _mine(data, "replace")
    out = data["root"] / "replace"
    mined = records.read_pairs(str(out / "train-*.array_record"))
    assert [p.pair_id for p in mined] == ["p0", "p1", "p2", "p3"]
    for pair, original in zip(mined, data["pairs"]):
        ids = [n.id for n in pair.negatives]
        expected = EXPECTED[pair.pair_id] or [n.id for n in original.negatives]  # nothing mined: its own kept
        assert ids == expected
        assert json.loads(pair.extra)["mined_negatives"] == len(EXPECTED[pair.pair_id])
        assert dataclasses_equal_but_negatives(pair, original)
        for n in pair.negatives:  # the candidate's own content, read by key from the candidate shards
            assert n == _side(n.id, CANDIDATES[n.id][0])
        assert not {pair.positive.id, "i2", "i3"} & set(ids[:len(EXPECTED[pair.pair_id])])
    assert [f["file"] for f in manifest["shards"]["train"]] == ["train-00000-of-00002.array_record",
                                                                 "train-00001-of-00002.array_record"]
    assert manifest["checkpoint"] == {"workdir": "W", "step": 7}
    assert manifest["rule"] == {"name": "mm-embed-modality", "target_modality": "the positive's modality", "k": 10,
                                "num_above": 2, "num_near": 1, "window": 3, "negatives": "replace"}
    c = manifest["counts"]
    assert (c["pairs"], c["mined_negatives"], c["pairs_with_mined"], c["above"], c["near"]) == (4, 7, 3, 5, 2)
    assert c["mined_per_pair"] == {"0": 1, "2": 2, "3": 1}
    assert (c["positive_in_top_k"], c["same_instance_dropped"], c["skipped"]) == (2, 1, 1)
    # Text candidates passed over above the positives: t1 for pair 0, it1 t3 t4 t1 for pair 1, i1 for pair 2.
    assert c["other_modality_above"] == 6
    assert [(s["index"], s["name"], s["field"], s["code"]) for s in manifest["skipped"]] == [
        (1, "p3", "positive.id", "unknown_name")]
    lines = [json.loads(x) for x in open(out / mining.PER_PAIR, encoding="utf-8")]
    assert [(x["key"], x["positive_rank"], x["above"], x["near"], x["same_instance"]) for x in lines] == [
        (0, 5, ["i1", "i4"], ["i5"], ["i3"]), (1, None, ["i7", "i6"], [], []), (2, 2, ["t3"], ["t4"], []),
        (3, None, [], [], [])]


def dataclasses_equal_but_negatives(pair: records.TrainingPair, original: records.TrainingPair) -> bool:
    """Everything but the negatives and extra["mined_negatives"] is the input pair's."""
    extra = json.loads(pair.extra)
    extra.pop("mined_negatives")
    return (pair.pair_id, pair.query, pair.positive, pair.instruction_set, pair.source_index, extra) == (
        original.pair_id, original.query, original.positive, original.instruction_set, original.source_index,
        json.loads(original.extra))


def test_rerun_gives_identical_bytes(data):
    _mine(data, "first")
    first = _files(data["root"] / "first")
    _mine(data, "first")  # rerun in place: finished shards reused, manifest rewritten the same
    _mine(data, "second")  # a fresh folder: everything written again
    assert _files(data["root"] / "first") == first == _files(data["root"] / "second")
    assert set(first) == {"manifest.json", "mined.jsonl", "train-00000-of-00002.array_record",
                          "train-00001-of-00002.array_record"}


def test_appended_negatives_come_first_in_the_trainer(data):
    _mine(data, "append", negatives="append")
    paths = sorted(str(p) for p in (data["root"] / "append").glob("train-*.array_record"))
    mined = records.read_pairs(paths)
    # Pair 2's own t4 was mined too: listed once, as mined; its ownneg follows. Pair 1 keeps its own t1 after.
    assert [[n.id for n in p.negatives] for p in mined] == [["i1", "i4", "i5"], ["i7", "i6", "t1"],
                                                            ["t3", "t4", "ownneg"], ["i1"]]
    example = PairExample(paths, {}, {}, 32, 1.0, 3, "train-*")
    for key, pair in enumerate(mined):
        negs = example.hard_negatives(key, pair, np.random.default_rng(key))
        assert [n.id for n in negs][:len(EXPECTED[pair.pair_id])] == EXPECTED[pair.pair_id]


def test_strict_and_bad_inputs(data, tmp_path):
    with pytest.raises(ConversionError, match=r"train-00001-of-00002.array_record: record 1 \('p3'\), field "
                                              r"'positive.id'.*'ghost'"):
        mining.mine_shards(data["train"], data["index"], data["queries"], str(tmp_path / "s"),
                           rule=mining.MiningRule(**RULE), strict=True)
    with pytest.raises(ValueError, match=r"query embeddings \(3, 3\).*\(4, 3\)"):
        mining.mine_shards(data["train"], data["index"], data["queries"][:3], str(tmp_path / "q"))
    unnamed = store.SearchIndex(data["index"].path, data["index"].dids, data["index"].modalities,
                                data["index"].embeddings, {**data["index"].meta, "source": {}})
    with pytest.raises(ConversionError, match="names no candidate folder"):
        mining.candidate_paths(unnamed)
    with pytest.raises(ConversionError, match="13 candidates, but the index"):
        few = tmp_path / "few"
        few.mkdir()
        _write(str(few / "candidates-00000-of-00001.array_record"), [b"x"] * 13)
        mining.candidate_paths(data["index"], str(few))


def test_pair_pool_holds_each_side_once_in_key_order(data, tmp_path):
    manifest = mining.write_pair_pool(data["train"], str(tmp_path / "pool"))
    pool = records.read_candidates(str(tmp_path / "pool" / mining.CANDIDATE_GLOB))
    # p0: pos0; p1: pos1, t1; p2: tpos2, t4, ownneg; p3: ghost, i1.
    assert [c.did for c in pool] == ["pos0", "pos1", "t1", "tpos2", "t4", "ownneg", "ghost", "i1"]
    assert [c.source_index for c in pool] == list(range(8)) and manifest["counts"]["candidates"] == 8
    assert pool[0].extra_fields == {"pair_id": "p0", "role": "positive", "instance": "cat"}
    assert pool[2].extra_fields == {"pair_id": "p1", "role": "negative"}
    assert records.Side(pool[1].did, pool[1].text, pool[1].image, pool[1].modality) == data["pairs"][1].positive
    first = _files(tmp_path / "pool")
    mining.write_pair_pool(data["train"], str(tmp_path / "pool"))
    assert _files(tmp_path / "pool") == first
    clash = tmp_path / "clash"
    clash.mkdir()
    _write(str(clash / "train-00000-of-00001.array_record"),
           [records.encode_pair(data["pairs"][1]), records.encode_pair(_pair(9, "t", _side("t1", "it")))])
    with pytest.raises(ConversionError, match="'t1' has another content in record 1 .* than in record 0"):
        mining.write_pair_pool(str(clash), str(tmp_path / "clash_pool"))


# ------------------------------------------------------------------------------------------------ the CLI, a tiny model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A training workdir of configs/mbeir.py:tiny (random weights, step 1), an index of a pool of 12 candidates
    (every third one text-only) recorded as its, and 6 training pairs whose positives are pool candidates."""
    import jax

    from configs import mbeir
    from idmr_jax import tasks
    from idmr_jax.bench.mbeir_memory import synthetic_jpeg, write_pool
    from idmr_jax.search import build
    from idmr_jax.train import checkpoint
    from idmr_jax.train.state import split_model

    root = tmp_path_factory.mktemp("cli")
    config = mbeir.get_config("tiny")
    config.eval.batch_size = 8
    task = tasks.build(config)

    def model_state():  # only the TrainState fields a model is restored from: no optimiser (3x faster to make)
        _, params, frozen = split_model(task.build_model(), task.frozen_patterns)
        return {"params": params, "frozen": frozen}

    saver = checkpoint.Checkpointer(root / "workdir", async_save=False)
    saver.save(1, jax.jit(model_state)(), None, checkpoint.config_to_json(config))
    saver.close()
    write_pool(str(root / "pool"), 12, image_side=48, num_queries=1, text_every=3)
    pool = records.read_candidates(str(root / "pool" / mining.CANDIDATE_GLOB))
    pairs = []
    for i in range(6):
        image = synthetic_jpeg(48, 100 + i) if i % 2 else None
        query = records.Side(id=f"q{i}", text=f"find candidate {i}", image=image,
                             modality="image,text" if image else "text")
        c = pool[2 * i]
        pairs.append(records.TrainingPair(
            pair_id=f"p{i}", query=query, instruction_set=("Find it.", "Retrieve the match.")[: i % 3], task_id=0,
            dataset_id=0, positive=records.Side(c.did, c.text, c.image, c.modality), negatives=(), source_index=i,
            extra="{}"))
    (root / "train").mkdir()
    _write(str(root / "train" / "train-00000-of-00001.array_record"), [records.encode_pair(p) for p in pairs])
    embedder = build.load_embedder(str(root / "workdir"))
    # The index as `python -m idmr_jax.search index` writes it, its embeddings random rather than the model's (the
    # search tool's tests check those): mining only needs them fixed, and embedding the pool would double the time.
    dim = build.embedding_dim(embedder, embedder.encoder)
    emb = np.random.default_rng(0).normal(size=(len(pool), dim)).astype(np.float32)
    store.write_index(str(root / "index"), [c.did for c in pool], [c.modality for c in pool], emb, block_rows=8,
                      source=build.open_source("shards", str(root / "pool")).describe(), model=embedder.source)
    return {"root": root, "pairs": pairs, "embedder": embedder}


def test_cli_mines_the_rule_over_the_models_own_ranking(tiny_run, capsys, monkeypatch):
    from idmr_jax import runtime
    from idmr_jax.mine import main
    from idmr_jax.search import build

    root, pairs = tiny_run["root"], tiny_run["pairs"]
    args = ["--workdir", str(root / "workdir"), "--train", str(root / "train"), "--index", str(root / "index"),
            "--k", "6", "--num-above", "2", "--num-near", "1", "--window", "2"]
    cache_dirs = []  # the compilation cache the CLI asks for (the test run's own stays in use: its variable wins)
    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda d=None: cache_dirs.append(d))
    assert main([*args, "--out", str(root / "mined"), "--compilation-cache-dir", "/x"]) == 0, capsys.readouterr().err
    assert cache_dirs == ["/x"]
    # The reference: the same queries as evaluation query records (the evaluation's text path), ranked by a
    # brute-force float32 dot product over the stored embeddings, and the rule applied to that ranking.
    index = store.open_index(str(root / "index"))
    queries = [build.text_query(p.query.text, p.query.image, qid=p.query.id) for p in pairs]
    queries = [records.QueryRecord(**{**q.__dict__, "instruction_set": p.instruction_set})
               for q, p in zip(queries, pairs)]
    scores = build.embed_queries(tiny_run["embedder"], queries) @ index.embeddings.T
    lines = [json.loads(x) for x in open(root / "mined" / mining.PER_PAIR, encoding="utf-8")]
    mined = records.read_pairs(str(root / "mined" / "train-*.array_record"))
    for pair, line, row in zip(pairs, lines, scores):
        top = np.argsort(-row, kind="stable")[:6]
        expected = mining.mine_negatives([index.dids[r] for r in top], [index.modalities[r] for r in top],
                                         positive=pair.positive.id, positives=set(),
                                         target_modality=pair.positive.modality, num_above=2, num_near=1, window=2)
        assert line["above"] + line["near"] == expected
        assert [n.id for n in mined[line["key"]].negatives] == expected
    manifest = json.load(open(root / "mined" / mining.MANIFEST, encoding="utf-8"))
    assert manifest["checkpoint"] == manifest["query_model"] == tiny_run["embedder"].source
    assert manifest["counts"]["mined_negatives"] == sum(len(x["above"]) + len(x["near"]) for x in lines) > 0
    # An index another model embedded is refused: its scores would not be comparable.
    meta = store.read_meta(str(root / "index"))
    foreign = root / "foreign"
    foreign.mkdir()
    for name in os.listdir(root / "index"):
        os.symlink(root / "index" / name, foreign / name)
    os.unlink(foreign / store.META)
    with open(foreign / store.META, "w", encoding="utf-8") as f:
        json.dump({**meta, "model": {"kind": "workdir", "checkpoint": "/elsewhere", "step": 3}}, f)
    assert main(["--workdir", str(root / "workdir"), "--train", str(root / "train"), "--index", str(foreign),
                 "--out", str(root / "no")]) == 2
    assert "query with the model that built the index" in capsys.readouterr().err
