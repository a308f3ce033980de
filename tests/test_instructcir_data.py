"""InstructCIR data: the caption-pair (jsonl, COCO) and instruction-triplet converters on tiny fixtures written
here (counts, pair contents, the original caption as the hard negative, bad rows named by file, line and field,
``--strict`` through the CLI), the universal demo's data (stage-1 and stage-2 shards, the zero-shot CIR val shards,
determinism) and the demo's CIR metrics against a hand-computed ranking."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import instructcir as cli
from idmr_jax.data.shards import ConversionError, file_sha256
from idmr_jax.tasks.universal import demo, records
from idmr_jax.tasks.universal.demo_eval import cir_metrics, ranking_records
from idmr_jax.tasks.universal.instructcir_data import convert_pairs


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "green"), ("c.png", "blue")):
        (folder / name).write_bytes(_png(colour))
    (folder / "bad.png").write_bytes(b"not an image at all")
    return folder


def _write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _skips(manifest):
    return sorted((s["file"], s["index"], s["field"], s["code"], s["action"]) for s in manifest["skipped"])


def _pairs(out):
    return records.read_pairs(os.path.join(out, "train-*.array_record"))


# --- converters ------------------------------------------------------------------------------------------------------


def test_caption_jsonl_pairs_and_skips(tmp_path, images):
    src = _write_lines(tmp_path / "caps.jsonl", [
        {"image": "a.png", "caption": "a red square"},                    # 0
        {"id": "b", "image": "b.png", "captions": ["a green square", "green box"]},  # 1: two pairs
        "{oops",                                                           # 2: not JSON
        {"image": "missing.png", "caption": "gone"},                      # 3: no such file
        {"image": "bad.png", "caption": "broken"},                        # 4: does not decode
        {"image": "c.png", "caption": ""},                                # 5: empty caption
        {"image": "c.png", "captions": ["blue", ""]},                     # 6: second caption dropped
        {"id": "b", "image": "c.png", "caption": "repeated id"},          # 7: duplicate id
        {"image": "a.png", "caption": "another red"},                     # 8: a.png's second caption
    ])
    out = tmp_path / "out"
    m = convert_pairs("captions", str(src), str(images), str(out), strict=False, shard_size=2)
    assert m["counts"] == {"pairs": 5, "images": 3, "hard_negatives": 0, "skipped": 6}
    assert _skips(m) == sorted([
        ("caps.jsonl", 2, "", "bad_type", "record_skipped"),
        ("caps.jsonl", 3, "image", "missing_image", "record_skipped"),
        ("caps.jsonl", 4, "image", "undecodable_image", "record_skipped"),
        ("caps.jsonl", 5, "caption", "empty_text", "record_skipped"),
        ("caps.jsonl", 6, "captions[1]", "empty_text", "entry_ignored"),
        ("caps.jsonl", 7, "id", "duplicate_id", "record_skipped")])
    pairs = _pairs(out)
    assert len(m["shards"]["train"]) == 3 and [s["records"] for s in m["shards"]["train"]] == [2, 2, 1]
    for shard in m["shards"]["train"]:
        assert file_sha256(out / shard["file"]) == shard["sha256"]
    assert m["sources"] == {"caps.jsonl": file_sha256(src)}
    got = [(p.pair_id, p.query.id, p.query.modality, p.positive.id, p.positive.text, p.source_index) for p in pairs]
    assert got == [("caps.jsonl:0", "a.png", "image", "a.png:cap0", "a red square", 0),
                   ("caps.jsonl:1", "b", "image", "b:cap0", "a green square", 1),
                   ("caps.jsonl:2", "b", "image", "b:cap1", "green box", 1),
                   ("caps.jsonl:3", "c.png", "image", "c.png:cap0", "blue", 6),
                   ("caps.jsonl:4", "a.png", "image", "a.png:cap1", "another red", 8)]
    assert pairs[0].query.image == (images / "a.png").read_bytes() and pairs[0].query.text is None
    assert all(p.negatives == () and p.instruction_set == () and p.positive.modality == "text" for p in pairs)
    # A rerun reuses every shard and writes the same manifest.
    assert convert_pairs("captions", str(src), str(images), str(out), strict=False, shard_size=2) == m


def test_coco_captions(tmp_path, images):
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"},
                       {"id": 3, "file_name": "missing.png"}, {"file_name": "c.png"}],
            "annotations": [{"image_id": 1, "caption": "red", "id": 10},
                            {"image_id": 1, "caption": "red again", "id": 11},
                            {"image_id": 2, "caption": "green", "id": 12}, {"image_id": 3, "caption": "gone", "id": 13},
                            {"image_id": 9, "caption": "nowhere", "id": 14}, {"image_id": 2, "caption": "x", "id": 12},
                            {"image_id": 2, "caption": "  ", "id": 15}]}
    src = tmp_path / "captions_train2017.json"
    src.write_text(json.dumps(coco))
    m = convert_pairs("coco", str(src), str(images), str(tmp_path / "out"), strict=False, shard_size=100)
    f = "captions_train2017.json"
    assert m["counts"]["pairs"] == 3 and m["counts"]["images"] == 2
    assert _skips(m) == sorted([(f, 3, "images.id", "missing_field", "record_skipped"),
                                (f, 4, "image_id", "unknown_name", "record_skipped"),
                                (f, 5, "id", "duplicate_id", "record_skipped"),
                                (f, 6, "caption", "empty_text", "record_skipped"),
                                (f, 3, "image", "missing_image", "record_skipped")])
    pairs = _pairs(tmp_path / "out")
    assert [(p.query.id, p.positive.id, p.positive.text) for p in pairs] == [
        ("1", "1:cap0", "red"), ("1", "1:cap1", "red again"), ("2", "2:cap0", "green")]
    assert pairs[2].query.image == (images / "b.png").read_bytes()
    with pytest.raises(ConversionError, match="COCO captions object"):
        src.write_text(json.dumps({"images": []}))
        convert_pairs("coco", str(src), str(images), str(tmp_path / "out2"), strict=False, shard_size=10)


def _triplet_rows():
    return [{"id": "t0", "image": "a.png", "instruction": "make it green", "modified_caption": "a green square",
             "original_caption": "a red square"},
            {"image": "b.png", "instruction": "make it blue", "modified_caption": "a blue square",
             "original_caption": "a green square"},
            {"image": "c.png", "instruction": "make it red", "modified_caption": "a red square"},
            {"image": "c.png", "instruction": 5, "modified_caption": "x", "original_caption": "y"},
            {"image": "missing.png", "instruction": "i", "modified_caption": "x", "original_caption": "y"}]


def test_triplets_carry_the_original_caption_as_hard_negative(tmp_path, images):
    src = _write_lines(tmp_path / "trip.jsonl", _triplet_rows())
    m = convert_pairs("triplets", str(src), str(images), str(tmp_path / "out"), strict=False, shard_size=10)
    assert m["counts"] == {"pairs": 2, "images": 2, "hard_negatives": 2, "skipped": 3}
    assert _skips(m) == sorted([("trip.jsonl", 2, "original_caption", "missing_field", "record_skipped"),
                                ("trip.jsonl", 3, "instruction", "bad_type", "record_skipped"),
                                ("trip.jsonl", 4, "image", "missing_image", "record_skipped")])
    a, b = _pairs(tmp_path / "out")
    assert (a.query.id, a.query.modality, a.query.text) == ("t0", "image,text", "make it green")
    assert a.query.image == (images / "a.png").read_bytes()
    assert (a.positive.id, a.positive.text, a.positive.modality) == ("t0:modified", "a green square", "text")
    assert [(n.id, n.text, n.modality) for n in a.negatives] == [("t0:original", "a red square", "text")]
    assert b.query.id == "trip.jsonl:1" and [n.text for n in b.negatives] == ["a green square"]
    assert json.loads(b.extra) == {"image": "b.png", "line": 1, "source": "trip.jsonl"}


def test_cli_strict_exits_2_listing_the_problems(tmp_path, images, capsys):
    src = _write_lines(tmp_path / "trip.jsonl", _triplet_rows())
    args = ["--format", "triplets", "--src", str(src), "--images", str(images)]
    assert cli.main([*args, "--out", str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "3 bad input entries" in err and "trip.jsonl: record 2" in err and "field 'original_caption'" in err
    assert "field 'image'" in err and not os.path.exists(tmp_path / "strict" / "manifest.json")
    assert cli.main([*args, "--out", str(tmp_path / "lenient")]) == 0
    assert "2 pairs of 2 images, 3 skipped" in capsys.readouterr().out


# --- the universal demo's data -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_builds(tmp_path_factory):
    """Both stages of two independent tiny builds (seed 0)."""
    out = []
    for n in range(2):
        cache = str(tmp_path_factory.mktemp(f"demo{n}"))
        out.append({stage: demo.build_demo_data(cache, 0, "tiny", stage) for stage in demo.STAGES})
    return out


def _caption_by_image(stage1_dir):
    return {json.loads(p.extra)["image"]: p.positive.text for p in _pairs(stage1_dir)}


def test_demo_stage1_and_stage2_shards(demo_builds):
    (s1, val), (s2, val2) = demo_builds[0]["captions"], demo_builds[0]["instructions"]
    assert val == val2
    bench = os.path.join(os.path.dirname(s1), "benchmark")
    ann = os.path.join(bench, "OACIRR-Subset/OACIRR-Demo/oacirr-demo")
    with open(os.path.join(ann, "image_splits/split.train.json")) as f:
        train_images = json.load(f)
    with open(os.path.join(ann, "quadruple_captions/caption_full.train.json")) as f:
        quadruples = json.load(f)
    captions = _caption_by_image(s1)
    assert sorted(captions) == sorted(train_images.values())  # one caption pair per train image
    assert len(set(captions.values())) == len(captions)       # the contexts make every caption distinct
    triplets = _pairs(s2)
    assert len(triplets) == len(quadruples)
    for t, q in zip(triplets, quadruples):
        assert t.query.modality == "image,text" and t.query.text == q["modification_text_mllm"]
        assert t.positive.text == captions[train_images[q["target"]]]
        assert [n.text for n in t.negatives] == [captions[train_images[q["reference"]]]]
        assert t.positive.text != t.negatives[0].text
    assert len(demo.CAPTION_TEMPLATES) >= 2


def test_demo_val_shards_and_determinism(demo_builds):
    _, val = demo_builds[0]["captions"]
    queries = records.read_queries(os.path.join(val, "queries-*.array_record"))
    candidates = records.read_candidates(os.path.join(val, "candidates-*.array_record"))
    dids = {c.did for c in candidates}
    assert queries and len(dids) == len(candidates)
    assert all(c.modality == "image" and c.extra_fields["pools"] == ["demo_cir"] for c in candidates)
    for q in queries:
        e = q.extra_fields
        assert q.modality == "image,text" and q.text and e["key"] == "demo_cir"
        assert len(q.positives) == 1 and q.positives[0] in dids and e["reference"] in dids
        assert q.positives[0] != e["reference"] and {q.positives[0], e["reference"]} <= set(e["instance_positives"])
        assert set(e["instance_positives"]) <= dids
    # A second build in another folder gives byte-identical shards.
    for stage in demo.STAGES:
        a, b = (build[stage] for build in demo_builds)
        for folder_a, folder_b in zip(a, b):
            names = sorted(n for n in os.listdir(folder_a) if n.endswith(".array_record"))
            assert names == sorted(n for n in os.listdir(folder_b) if n.endswith(".array_record"))
            assert [file_sha256(os.path.join(folder_a, n)) for n in names] == [
                file_sha256(os.path.join(folder_b, n)) for n in names]


# --- zero-shot CIR metrics -----------------------------------------------------------------------------------------


def test_cir_metrics_on_a_hand_computed_ranking():
    gallery = ["a", "b", "c", "d", "e"]  # instance X = {a, b, e}, Y = {c, d}
    rankings = np.array([[0, 4, 2, 1, 3],   # ref a, target b -> without a: e c b d: target at 2, instance (e) at 0
                         [3, 2, 0, 1, 4],   # ref c, target d -> d a b e: target at 0, instance at 0
                         [0, 1, 4, 3, 2]])  # ref d, target c -> a b e c: target at 3, instance (c) at 3
    kw = dict(gallery=gallery, query_ids=["q0", "q1", "q2"], references=["a", "c", "d"], targets=["b", "d", "c"],
              instance_positives=[["a", "b", "e"], ["c", "d"], ["c", "d"]])
    m = cir_metrics(rankings, **kw)
    assert m == pytest.approx({"demo_cir/R@1": 100 / 3, "demo_cir/R@5": 100.0, "demo_cir/R@10": 100.0,
                               "demo_cir/R_ID@1": 200 / 3, "demo_cir/R_ID@5": 100.0})
    assert cir_metrics(rankings, ks=(3,), id_ks=(3,), **kw) == pytest.approx(
        {"demo_cir/R@3": 200 / 3, "demo_cir/R_ID@3": 200 / 3})
    recs = ranking_records(rankings, gallery=gallery, query_ids=["q0", "q1", "q2"], references=["a", "c", "d"])
    assert recs[0] == {"query_id": "q0", "ranking": ["e", "c", "b", "d"]}
    with pytest.raises(ValueError, match="q1: target 'c' is its own reference"):
        cir_metrics(rankings, **{**kw, "targets": ["b", "c", "c"]})
    with pytest.raises(ValueError, match="q0: target 'z' is not in the gallery"):
        cir_metrics(rankings, **{**kw, "targets": ["z", "d", "c"]})
