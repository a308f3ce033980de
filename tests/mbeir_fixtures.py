"""A tiny M-BEIR release in the released layout (EVAL_FORMATS.md, M-BEIR), for the reader, converter and metric
tests: four keys (a text->image set with MSCOCO's split-named pool, a text-only candidate pool, a fashion key with
wide K, and OVEN with positives living in InfoSeek's pool), the instruction table, qrels, a few small images, and
the union pool. `write_mbeir` returns what the tests need to know about it."""

from __future__ import annotations

import json
import os

from cir_fixtures import write_image

SPLIT = "test"
KEYS = ("mscoco_task0", "webqa_task1", "fashioniq_task7", "oven_task6")
HEADER = "query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"
# (query modality, candidate modality, dataset name, dataset id, prompts): empty prompts are left out on reading.
INSTRUCTIONS = [
    ("text", "image", "MSCOCO", 9, ["Find an everyday image matching the caption.", "Show me the scene described.",
                                    "", ""]),
    ("image", "text", "MSCOCO", 9, ["Write out a caption for this everyday image.", "", "", ""]),
    ("text", "text", "WebQA", 2, ["Find a Wikipedia passage answering the question.", "Which snippet answers this?",
                                  "Retrieve evidence for the question.", "Look up the answer to this question."]),
    ("image,text", "image", "FashionIQ", 7, ["Find the garment the note describes.", "Change the garment as told.",
                                             "Retrieve the modified fashion item.", ""]),
    ("image,text", "text", "OVEN", 5, ["Name the entity shown in the image.", "Find the Wikipedia entry for this.",
                                       "", ""]),
]


def _img(folder: str, name: str) -> str:
    return f"mbeir_images/{folder}_images/{name}.jpg"


def _query(qid, text, image, modality, task_id, positives, negatives=()):
    return {"qid": qid, "query_txt": text, "query_img_path": image, "query_modality": modality,
            "query_src_content": json.dumps({"id": qid}), "pos_cand_list": list(positives),
            "neg_cand_list": list(negatives), "task_id": task_id}


def _cand(did, text=None, image=None):
    modality = "image,text" if text and image else "image" if image else "text"
    return {"txt": text, "img_path": image, "modality": modality, "did": did, "src_content": json.dumps({"d": did})}


QUERIES = {
    "mscoco_task0": [_query("9:1", "a dog on a couch", None, "text", 0, ["9:101"]),
                     _query("9:2", "two people skiing", None, "text", 0, ["9:102"]),
                     _query("9:3", "a red bus", None, "text", 0, ["9:103"])],
    "webqa_task1": [_query("2:1", "who built the tower?", None, "text", 1, ["2:201"], ["2:203"]),
                    _query("2:2", "what colour is the bridge?", None, "text", 1, ["2:202"])],
    "fashioniq_task7": [_query("7:1", "is darker and shorter", _img("fashioniq", "q1"), "image,text", 7, ["7:301"]),
                        _query("7:2", "has long sleeves", _img("fashioniq", "q2"), "image,text", 7, ["7:302"])],
    # 5:2 also lists an InfoSeek positive, 5:3 only one: both live in InfoSeek's pool (the documented oddity).
    "oven_task6": [_query("5:1", "what is this building?", _img("oven", "o1"), "image,text", 6, ["5:401"]),
                   _query("5:2", "what breed is this?", _img("oven", "o2"), "image,text", 6, ["5:402", "6:501"]),
                   _query("5:3", "what plane is this?", _img("oven", "o3"), "image,text", 6, ["6:502"])],
}
POOLS = {
    "mscoco_task0_test": [_cand(f"9:10{i}", image=_img("mscoco", f"c{i}")) for i in (1, 2, 3)],
    "webqa_task1": [_cand("2:201", "Gustave Eiffel built it."), _cand("2:202", "The bridge is red."),
                    _cand("2:203", "The tower is 330 m tall.")],
    "fashioniq_task7": [_cand(f"7:30{i}", image=_img("fashioniq", f"t{i}")) for i in (1, 2, 3)],
    "oven_task6": [_cand("5:401", "Taj Mahal"), _cand("5:402", "Beagle"), _cand("5:403", "Boeing 747")],
}
INFOSEEK = [_cand("6:501", "Beagle (dog breed)"), _cand("6:502", "Airbus A380")]  # only in the union pool


def _broken_rows() -> tuple[dict, dict, list[str], list[tuple[str | None, str, str, str]]]:
    """Broken query rows, pool rows and qrels lines, and what each gives: (name, code, field, stage)."""
    no_text = _query("9:90", "x", None, "text", 0, ["9:101"])
    del no_text["query_txt"]
    queries = {
        "mscoco_task0": ["{not json", no_text, _query("9:91", "x", None, "video", 0, ["9:101"]),
                         _query("9:92", "   ", None, "text", 0, ["9:101"]),
                         _query("9:93", "a cat", _img("mscoco", "c1"), "text", 0, ["9:101"]),
                         dict(_query("9:94", "a cat", None, "text", 0, []), pos_cand_list="9:101"),
                         _query("9:1", "a repeated qid", None, "text", 0, ["9:101"]),
                         _query("9:95", "a positive outside every pool", None, "text", 0, ["9:999"]),
                         _query("9:96", "a query without qrels", None, "text", 0, ["9:101"]),
                         _query("9:97", "a query of another task", None, "text", 3, ["9:101"])],
        "webqa_task1": [_query("2:3", "an unknown negative", None, "text", 1, ["2:202"], ["2:777"])],
        "fashioniq_task7": [_query("7:3", "its target's image is missing", _img("fashioniq", "q1"), "image,text",
                                   7, ["7:303"]),
                            _query("7:4", "its own image is missing", _img("fashioniq", "q4"), "image,text", 7,
                                   ["7:301"])],
    }
    pools = {"webqa_task1": [_cand("2:201", "another text"), _cand("2:204", "")]}
    qrels = ["9:1 0 9:101"]
    broken = [(None, "bad_type", "", "reader"), ("9:90", "missing_field", "query_txt", "reader"),
              ("9:91", "bad_type", "query_modality", "reader"), ("9:92", "empty_text", "query_txt", "reader"),
              ("9:93", "modality_mismatch", "query_img_path", "reader"),
              ("9:94", "bad_type", "pos_cand_list", "reader"), ("9:1", "duplicate_query", "qid", "reader"),
              ("9:97", "key_mismatch", "task_id", "reader"), ("2:201", "duplicate_name", "did", "reader"),
              ("2:204", "empty_text", "txt", "reader"), ("9:1", "bad_type", "line", "reader"),
              ("9:95", "unknown_name", "positives[0]", "converter"), ("9:96", "no_qrels", "qid", "converter"),
              ("2:3", "unknown_name", "negatives[0]", "converter"), ("7:303", "missing_image", "image", "converter"),
              ("7:3", "unusable_image", "positives[0]", "converter"), ("7:4", "missing_image", "image", "converter")]
    return queries, pools, qrels, broken


def _write_lines(path: str, lines: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _jsonl(rows: list) -> list[str]:
    return [row if isinstance(row, str) else json.dumps(row) for row in rows]


def write_mbeir(root: str, broken: bool = False) -> dict:
    """Writes the release under `root` (test split); with `broken`, one bad row of each kind besides. Returns
    keys, valid query ids per key, positives per qid, usable candidates per pool (and of the union pool), the
    instruction rows, and ``broken``: (name, code, field, stage) per bad entry, stage "reader" or "converter"."""
    queries = {key: list(rows) for key, rows in QUERIES.items()}
    pools = {name: list(rows) for name, rows in POOLS.items()}
    bad_queries, bad_pools, bad_qrels, expected = _broken_rows() if broken else ({}, {}, [], [])
    for key, rows in bad_queries.items():
        queries[key] += rows
    for name, rows in bad_pools.items():
        pools[name] += rows
    for key, rows in queries.items():
        _write_lines(os.path.join(root, f"query/{SPLIT}/mbeir_{key}_{SPLIT}.jsonl"), _jsonl(rows))
        qrels = [f"{row['qid']} 0 {did} 1 {row['task_id']}" for row in rows if isinstance(row, dict)
                 and row["qid"] != "9:96" and isinstance(row["pos_cand_list"], list) for did in row["pos_cand_list"]]
        qrels += bad_qrels if key == "mscoco_task0" else []
        _write_lines(os.path.join(root, f"qrels/{SPLIT}/mbeir_{key}_{SPLIT}_qrels.txt"), qrels)
    for name, rows in pools.items():
        _write_lines(os.path.join(root, f"cand_pool/local/mbeir_{name}_cand_pool.jsonl"), _jsonl(rows))
    union = sorted([row for rows in POOLS.values() for row in rows] + INFOSEEK,
                   key=lambda row: tuple(int(x) for x in row["did"].split(":")))
    _write_lines(os.path.join(root, f"cand_pool/global/mbeir_union_{SPLIT}_cand_pool.jsonl"), _jsonl(union))
    _write_lines(os.path.join(root, "instructions/query_instructions.tsv"),
                 [HEADER] + ["\t".join([qm, cm, name, str(did), *prompts]) for qm, cm, name, did, prompts
                             in INSTRUCTIONS])
    images = {row[field] for rows in list(QUERIES.values()) + list(POOLS.values()) for row in rows
              for field in ("query_img_path", "img_path") if row.get(field)}
    for seed, rel in enumerate(sorted(images)):
        if not (broken and rel == _img("fashioniq", "t3")):  # 7:303's image is missing in the broken release
            write_image(os.path.join(root, rel), seed)
    valid = {key: [row["qid"] for row in rows] for key, rows in QUERIES.items()}
    # the rows the reader keeps: the converter drops some of them (stage "converter")
    later = {name for name, _, _, stage in expected if stage == "converter"}
    read = {key: ids + [row["qid"] for row in bad_queries.get(key, []) if isinstance(row, dict) and row["qid"] in later]
            for key, ids in valid.items()}
    if broken:
        valid["webqa_task1"].append("2:3")
    return {
        "split": SPLIT, "keys": KEYS, "valid_query_ids": valid, "read_query_ids": read,
        "positives": {row["qid"]: row["pos_cand_list"] for rows in QUERIES.values() for row in rows},
        "candidates": {name: [row["did"] for row in rows if not (broken and row["did"] == "7:303")]
                       for name, rows in POOLS.items()},
        "union_candidates": [row["did"] for row in union if not (broken and row["did"] == "7:303")],
        "instructions": INSTRUCTIONS, "broken": expected,
    }
