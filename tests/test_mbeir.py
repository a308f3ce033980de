"""M-BEIR: the universal record schema, the release reader on a tiny release in the released layout (counts,
instructions, every bad row reported by name and field), the fixed instruction choice, the converter's shards and
manifest (``--strict`` included), and UniIR's recall metric against hand-computed rankings."""

import hashlib
import json
import os

import pytest

from data_prep import mbeir as mbeir_cli
from idmr_jax.data.shards import ConversionError, file_sha256
from idmr_jax.tasks.universal import mbeir, records
from idmr_jax.tasks.universal.mbeir_convert import convert
from mbeir_fixtures import INSTRUCTIONS, write_mbeir

KEYS = ["mscoco_task0", "webqa_task1", "fashioniq_task7", "oven_task6"]


def _skips_of(skips):
    return sorted((s.name or "", s.code, s.field) for s in skips)


def _expected(info, stages=("reader",)):
    return sorted((name or "", code, field) for name, code, field, stage in info["broken"] if stage in stages)


# --- records -------------------------------------------------------------------------------------------------------


def _query_record(**change):
    fields = dict(qid="7:1", text="is darker", image=b"\xff\xd8jpeg", modality="image,text",
                  instruction_set=("Find the garment.",), task_id=7, dataset_id=7, positives=("7:301",),
                  negatives=(), source_index=0, extra="{}")
    fields.update(change)
    return records.QueryRecord(**fields)


def test_records_round_trip_and_name_the_bad_field():
    q = _query_record()
    assert records.decode_query(records.encode_query(q)) == q
    c = records.CandidateRecord(did="2:201", text="Gustave Eiffel.", image=None, modality="text", source_index=3,
                                extra='{"pools": ["webqa_task1"]}')
    assert records.decode_any(records.encode_candidate(c)) == c
    bad = [(dict(modality="image"), "text"), (dict(image=None), "image"), (dict(modality="audio"), "modality"),
           (dict(text="  "), "text"), (dict(positives=("7:301", 3)), "positives[1]"), (dict(extra="[]"), "extra"),
           (dict(task_id=-1), "task_id"), (dict(instruction_set=("",)), "instruction_set[0]")]
    for change, field in bad:
        with pytest.raises(records.RecordError) as e:
            records.encode_query(_query_record(**change))
        assert e.value.field == field, change
    assert records.modality_of(True, False) == "text" and records.modality_of(True, True) == "image,text"


# --- reader --------------------------------------------------------------------------------------------------------


def test_layout_and_protocol_constants():
    assert len(mbeir.TEST_KEYS) == 16 and mbeir.TEST_KEYS[0] == "visualnews_task0"
    assert mbeir.TEST_KEYS[-1] == "infoseek_task8"
    assert mbeir.KS["fashioniq_task7"] == (10, 20, 50) and mbeir.KS["cirr_task7"] == (1, 5, 10)
    assert [k for k in mbeir.TEST_KEYS if mbeir.HEADLINE_K[k] == 10] == ["fashion200k_task0", "fashion200k_task3",
                                                                          "fashioniq_task7"]
    assert mbeir.local_pool_name("mscoco_task3", "test") == "mscoco_task3_test"
    assert mbeir.pool_file("cirr_task7") == "cand_pool/local/mbeir_cirr_task7_cand_pool.jsonl"
    assert mbeir.pool_file("union_test") == "cand_pool/global/mbeir_union_test_cand_pool.jsonl"
    assert mbeir.parse_key("infoseek_task8") == (6, 8) and mbeir.key_of(9, 3) == "mscoco_task3"
    with pytest.raises(ValueError):
        mbeir.parse_key("mscoco_task5")


def test_reader_counts_and_fields(tmp_path):
    info = write_mbeir(str(tmp_path))
    root = str(tmp_path)
    for key in KEYS:
        queries, skips = mbeir.read_queries(root, "test", key)
        assert [q.qid for q in queries] == info["valid_query_ids"][key] and skips == []
    queries, _ = mbeir.read_queries(root, "test", "oven_task6")
    q = queries[1]
    assert (q.qid, q.text, q.modality, q.task_id, q.dataset_id) == ("5:2", "what breed is this?", "image,text", 6, 5)
    assert q.image_path == "mbeir_images/oven_images/o2.jpg" and os.path.isfile(tmp_path / q.image_path)
    assert q.positives == ("5:402", "6:501") and mbeir.home_positives(q) == ("5:402",)
    assert q.extra == {"key": "oven_task6", "src_content": json.dumps({"id": "5:2"})} and q.source_index == 1
    for pool, dids in info["candidates"].items():
        candidates, skips = mbeir.read_pool(root, pool)
        assert [c.did for c in candidates] == dids and skips == []
    text_only, _ = mbeir.read_pool(root, "webqa_task1")
    assert all(c.modality == "text" and c.image_path is None for c in text_only)
    union, _ = mbeir.read_pool(root, "union_test")
    assert [c.did for c in union] == info["union_candidates"]
    qrels, skips = mbeir.read_qrels(root, "test", "oven_task6")
    assert qrels == {"5:1": ("5:401",), "5:2": ("5:402", "6:501"), "5:3": ("6:502",)} and skips == []


def test_reader_reports_every_bad_row(tmp_path):
    info = write_mbeir(str(tmp_path), broken=True)
    root, skips = str(tmp_path), []
    for key in KEYS:
        skips += mbeir.read_queries(root, "test", key)[1] + mbeir.read_qrels(root, "test", key)[1]
        assert [q.qid for q in mbeir.read_queries(root, "test", key)[0]] == info["read_query_ids"][key]
    for pool in info["candidates"]:
        skips += mbeir.read_pool(root, pool)[1]
    assert _skips_of(skips) == _expected(info)
    by = {(s.name, s.code): s for s in skips}
    assert by[("9:92", "empty_text")].file == "query/test/mbeir_mscoco_task0_test.jsonl"
    assert by[("9:92", "empty_text")].index == 6  # its line in the file
    assert by[("9:1", "bad_type")].action == "entry_ignored"  # a qrels line
    assert by[("2:204", "empty_text")].file == "cand_pool/local/mbeir_webqa_task1_cand_pool.jsonl"


def test_instructions_attached_and_fixed(tmp_path):
    write_mbeir(str(tmp_path))
    table = mbeir.read_instructions(str(tmp_path))
    assert table[(9, "text", "image")] == INSTRUCTIONS[0][4][:2]  # empty prompts left out
    assert len(table[(2, "text", "text")]) == 4 and len(table) == len(INSTRUCTIONS)
    queries, _ = mbeir.read_queries(str(tmp_path), "test", "webqa_task1")
    prompts = table[(2, "text", "text")]
    for q in queries:  # the index is sha256(qid)[:8] big-endian modulo the number of prompts
        index = int.from_bytes(hashlib.sha256(q.qid.encode()).digest()[:8], "big") % len(prompts)
        assert mbeir.instruction_for(q, table, "text") == mbeir.uniir_text(prompts[index])
        assert mbeir.instruction_for(q, table, "text") == mbeir.instruction_for(q, table, "text")
    chosen = {mbeir.choose_instruction(f"2:{n}", prompts) for n in range(40)}
    assert len(chosen) == 4  # spread over every prompt, yet fixed per qid
    assert mbeir.instruction_for(queries[0], table, "image") is None  # no (2, text, image) row
    instructed = mbeir.instructed_text("Which snippet answers this?", "who built it")
    assert instructed == "Which snippet answers this? who built it."
    assert mbeir.instructed_text(None, '"a red bus"') == "A red bus."
    oven, _ = mbeir.read_queries(str(tmp_path), "test", "oven_task6")
    # the home positive's modality from the pool; 5:3's only positive is in InfoSeek's pool: the task's target
    assert mbeir.positive_modality(oven[1], {"5:402": "image,text"}) == "image,text"
    assert mbeir.positive_modality(oven[2], {"5:402": "image,text"}) == "text"


# --- converter -----------------------------------------------------------------------------------------------------


def test_convert_local_pools(tmp_path):
    root, out = tmp_path / "mbeir", tmp_path / "out"
    info = write_mbeir(str(root))
    manifest = convert(str(root), "test", str(out), keys=KEYS)
    assert manifest == json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["queries"] == 10 and counts["candidates"] == 12 and counts["skipped"] == 0
    assert counts["queries_by_key"] == {key: len(info["valid_query_ids"][key]) for key in KEYS}
    assert counts["candidates_by_pool"] == {name: 3 for name in info["candidates"]}
    assert manifest["skipped"] == [] and manifest["args"]["pool"] == "local"
    for kind in ("queries", "candidates"):
        for shard in manifest["shards"][kind]:
            assert file_sha256(out / shard["file"]) == shard["sha256"]
    assert manifest["sources"]["instructions/query_instructions.tsv"] == file_sha256(
        root / "instructions/query_instructions.tsv")
    assert "cand_pool/local/mbeir_mscoco_task0_test_cand_pool.jsonl" in manifest["sources"]
    queries = {q.qid: q for q in records.read_queries(str(out / "queries-*.array_record"))}
    assert list(queries) == [qid for key in KEYS for qid in info["valid_query_ids"][key]]
    table = mbeir.read_instructions(str(root))
    assert queries["9:1"].instruction_set == tuple(table[(9, "text", "image")]) and queries["9:1"].image is None
    assert queries["7:1"].image == (root / "mbeir_images/fashioniq_images/q1.jpg").read_bytes()
    assert queries["5:3"].positives == ("6:502",) and queries["5:3"].extra_fields["pool"] == "oven_task6"
    assert queries["5:3"].instruction_set == tuple(table[(5, "image,text", "text")])
    assert queries["2:1"].negatives == ("2:203",) and queries["2:1"].extra_fields["key"] == "webqa_task1"
    candidates = {c.did: c for c in records.read_candidates(str(out / "candidates-*.array_record"))}
    assert list(candidates) == [did for dids in info["candidates"].values() for did in dids]
    assert candidates["9:101"].modality == "image" and candidates["9:101"].text is None
    assert candidates["2:201"].image is None and candidates["2:201"].extra_fields["pools"] == ["webqa_task1"]
    assert convert(str(root), "test", str(out), keys=KEYS) == manifest  # rerun: shards reused, same manifest


def test_convert_global_pool(tmp_path):
    root, out = tmp_path / "mbeir", tmp_path / "out"
    info = write_mbeir(str(root))
    manifest = convert(str(root), "test", str(out), keys=KEYS, pool="global")
    assert manifest["counts"]["candidates_by_pool"] == {"union_test": len(info["union_candidates"])}
    candidates = records.read_candidates(str(out / "candidates-*.array_record"))
    assert [c.did for c in candidates] == info["union_candidates"]  # InfoSeek's 6:501 and 6:502 included
    queries = records.read_queries(str(out / "queries-*.array_record"))
    assert {q.extra_fields["pool"] for q in queries} == {"union_test"}


def test_convert_broken_and_strict(tmp_path):
    root, out = tmp_path / "mbeir", tmp_path / "out"
    info = write_mbeir(str(root), broken=True)
    manifest = convert(str(root), "test", str(out), keys=KEYS)
    got = sorted((s["name"] or "", s["code"], s["field"]) for s in manifest["skipped"])
    assert got == _expected(info, ("reader", "converter"))
    queries = records.read_queries(str(out / "queries-*.array_record"))
    assert [q.qid for q in queries] == [qid for key in KEYS for qid in info["valid_query_ids"][key]]
    assert {q.qid: q.negatives for q in queries}["2:3"] == ()  # its unknown negative dropped, the query kept
    dids = [c.did for c in records.read_candidates(str(out / "candidates-*.array_record"))]
    assert "7:303" not in dids and dids.count("2:201") == 1
    with pytest.raises(ConversionError) as e:
        convert(str(root), "test", str(tmp_path / "strict"), keys=KEYS, strict=True)
    message = str(e.value)
    assert f"--strict: {len(info['broken'])} bad input entries" in message
    assert "query/test/mbeir_mscoco_task0_test.jsonl: record 6 ('9:92'), field 'query_txt'" in message
    assert "('7:3'), field 'positives[0]'" in message and not (tmp_path / "strict").exists()
    args = ["--root", str(root), "--split", "test", "--keys", ",".join(KEYS)]
    assert mbeir_cli.main(args + ["--out", str(tmp_path / "cli"), "--strict"]) == 2
    assert mbeir_cli.main(args + ["--out", str(tmp_path / "cli")]) == 0


# --- metric --------------------------------------------------------------------------------------------------------


class _Q:
    def __init__(self, qid, *positives):
        self.qid, self.positives = qid, positives


def _ranking(hit: str | None, at: int, size: int = 60) -> list[str]:
    """`size` distractor dids with `hit` at 0-based position `at`."""
    ranking = [f"0:{n}" for n in range(size)]
    if hit is not None:
        ranking[at] = hit
    return ranking


def test_metrics_hand_computed():
    queries = {
        "mscoco_task0": [_Q("9:1", "9:101"), _Q("9:2", "9:102"), _Q("9:3", "9:103")],
        "fashioniq_task7": [_Q("7:1", "7:301"), _Q("7:2", "7:302")],
        "oven_task6": [_Q("5:2", "6:501"), _Q("5:1", "5:401", "5:409")],
    }
    rankings = {
        "9:1": _ranking("9:101", 0), "9:2": _ranking("9:102", 3), "9:3": _ranking("9:103", 10),
        "7:1": _ranking("7:301", 14), "7:2": _ranking("7:302", 45),
        "5:2": _ranking(None, 0),  # its positive lives in InfoSeek's pool: a miss on the local pool
        "5:1": _ranking("5:409", 2),  # its second positive at rank 3: any positive counts
    }
    m = mbeir.compute_metrics(queries, rankings)
    assert m["mbeir/mscoco_task0/R@1"] == pytest.approx(100 / 3)
    assert m["mbeir/mscoco_task0/R@5"] == pytest.approx(200 / 3)
    assert m["mbeir/mscoco_task0/R@10"] == pytest.approx(200 / 3)
    assert (m["mbeir/fashioniq_task7/R@10"], m["mbeir/fashioniq_task7/R@20"], m["mbeir/fashioniq_task7/R@50"]) == (
        0.0, 50.0, 100.0)
    assert (m["mbeir/oven_task6/R@1"], m["mbeir/oven_task6/R@5"], m["mbeir/oven_task6/R@10"]) == (0.0, 50.0, 50.0)
    assert "mbeir/fashioniq_task7/R@1" not in m and len(m) == 10
    # headline: R@5, R@10 for the fashion key, averaged over the keys present
    assert m["mbeir/avg/headline"] == pytest.approx((200 / 3 + 0.0 + 50.0) / 3)


def test_metrics_errors_name_the_query():
    queries = {"cirr_task7": [_Q("8:1", "8:11"), _Q("8:2", "8:12")]}
    with pytest.raises(ValueError, match="'8:2' has no ranking"):
        mbeir.compute_metrics(queries, {"8:1": ["8:11"]})
    with pytest.raises(ValueError, match="'8:1'.*twice"):
        mbeir.compute_metrics(queries, {"8:1": ["8:11", "8:11"], "8:2": ["8:12"]})
    q = _query_record(qid="8:3", positives=("8:13",))  # universal query records work too
    assert mbeir.compute_metrics({"cirr_task7": [q]}, {"8:3": ["8:9", "8:13"]})["mbeir/cirr_task7/R@1"] == 0.0
