"""CIRR and CIRCO benchmark modules: the readers on tiny releases in every folder convention (each valid record
converted, each broken one skipped with its code and field), the official metrics against hand-computed values,
the written ranking lines and the test-server submission files."""

import json
import os

import pytest

from cir_fixtures import write_circo, write_cirr
from idmr_jax.tasks.cir import benchmarks
from idmr_jax.tasks.cir.benchmarks import circo, cirr
from idmr_jax.tasks.cir.benchmarks.base import ConversionError, Query

# Codes the converter (not the reader) reports: the reader only resolves paths.
CONVERTER_CODES = {"missing_image_file"}


def _reader_broken(info):
    return {name: code for name, code in info["broken"].items() if code not in CONVERTER_CODES}


def _check_skips(release, info):
    """Every broken record of the fixture is skipped once, by name, with its code and field; nothing else is."""
    got = {(s.name, s.code): s.field for s in release.skips}
    want = {(name, code): info["fields"][name] for name, code in _reader_broken(info).items()}
    assert got == want
    assert all(s.action == "record_skipped" and s.index is not None for s in release.skips)


def test_registry_finds_both():
    assert {"cirr", "circo"} <= set(benchmarks.names())
    assert benchmarks.get("cirr") is cirr and benchmarks.get("circo") is circo


# --- CIRR reader -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["readme", "clip4cir"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_cirr_reader(tmp_path, layout, split):
    info = write_cirr(str(tmp_path), layout=layout, split=split, broken=True)
    release = cirr.read_release(str(tmp_path), split)
    assert [q.query_id for q in release.queries] == info["valid_query_ids"]
    _check_skips(release, info)
    keys = [image.key for image in release.images]
    assert keys == sorted(keys) and len(keys) == info["num_images"]
    assert "dev-8-0-img0" not in keys  # its split-map path is not a string
    image_dir = {"readme": "img_raw", "clip4cir": ""}[layout]
    folder = {"val": "dev", "test": "test1"}[split]
    by_key = {image.key: image for image in release.images}
    assert by_key["dev-1-3-img1"].path == os.path.normpath(os.path.join(image_dir, folder, "dev-1-3-img1.png"))
    for image in release.images:  # every path resolves to the fixture's file, except the one left off on purpose
        assert os.path.isfile(tmp_path / image.path) == (image.key != "dev-2-0-img0")

    q = {query.query_id: query for query in release.queries}
    assert q["101"].reference == "dev-0-2-img0" and q["101"].text == "add a dog"
    assert q["101"].subset == tuple(f"dev-0-{m}-img{m % 2}" for m in range(6))
    assert q["101"].extra["img_set_id"] == 0
    assert q["101"].source.endswith(".json") and q["101"].source_index == 1
    if split == "val":
        assert q["101"].targets == ("dev-0-3-img1",)
        assert q["101"].extra["target_soft"] == {"dev-0-3-img1": 1.0, "dev-0-4-img0": -1.0}
        # A documented oddity, kept: target_hard absent from target_soft.
        assert q["102"].targets == ("dev-0-5-img1",) and "dev-0-5-img1" not in q["102"].extra["target_soft"]
    else:
        assert all(query.targets == () and "target_soft" not in query.extra for query in release.queries)
    assert release.counts["queries"] == len(info["valid_query_ids"])
    ann_dir, file_split = {"readme": "", "clip4cir": "cirr/"}[layout], {"val": "val", "test": "test1"}[split]
    assert set(release.sources) == {f"{ann_dir}captions/cap.rc2.{file_split}.json",
                                    f"{ann_dir}image_splits/split.rc2.{file_split}.json"}


def test_cirr_clean_fixture_has_no_skips(tmp_path):
    info = write_cirr(str(tmp_path))
    release = cirr.read_release(str(tmp_path), "val")
    assert release.skips == [] and len(release.queries) == 6 and len(release.images) == info["num_images"] == 12


def test_cirr_layout_errors(tmp_path):
    with pytest.raises(ConversionError, match="README layout.*CLIP4Cir/SEARLE layout"):
        cirr.read_release(str(tmp_path), "val")
    info = write_cirr(str(tmp_path), layout="clip4cir")
    os.remove(info["captions"])
    with pytest.raises(ConversionError, match=r"cirr/captions/cap\.rc2\.val\.json: missing"):
        cirr.read_release(str(tmp_path), "val")


# --- CIRR protocol -----------------------------------------------------------------------------------------------

NAMES = [f"g{i:02d}" for i in range(60)]


def _cirr_query(qid, reference, target, members):
    return Query(query_id=qid, reference=reference, text="t", targets=(target,) if target else (),
                 subset=tuple(members))


def _ranked(first):
    """`first`, then the rest of the 60-image gallery in name order."""
    return list(first) + [n for n in NAMES if n not in first]


def _cirr_case():
    """Three queries; hand-computed positions after the reference is removed:
    q1: target at 6 (R@10 not R@5), members ranked g01, g03 (Rs@2 not Rs@1);
    q2: target at 50 in a 55-long line (a real miss of R@50), first among members (Rs@1);
    q3: target first everywhere."""
    q1 = _cirr_query("1", "g00", "g03", NAMES[0:6])
    q2 = _cirr_query("2", "g10", "g15", NAMES[10:16])
    q3 = _cirr_query("3", "g20", "g21", NAMES[20:26])
    ranked = {
        "1": _ranked(["g30", "g31", "g01", "g32", "g33", "g00", "g34", "g03"]),
        "2": _ranked(["g10"] + NAMES[20:60] + NAMES[0:10] + ["g15", "g11", "g12", "g13", "g14"]),
        "3": _ranked(["g21", "g20"]),
    }
    return [q1, q2, q3], ranked


def test_cirr_output_ranking_keeps_51_and_every_member():
    queries, ranked = _cirr_case()
    line = cirr.output_ranking(queries[1], ranked["2"], [])
    assert line[:51] == ranked["2"][:51] and line[0] == "g10"  # the reference is still in the written line
    assert line[51:] == ["g15", "g11", "g12", "g13", "g14"]  # members beyond the top 51, in rank order
    assert cirr.output_ranking(queries[0], ranked["1"], []) == ranked["1"][:51]  # members all in the top 51
    assert cirr.output_ranking(queries[0], NAMES[:12], []) == NAMES[:12]  # a small gallery: all of it


def test_cirr_metrics_by_hand():
    queries, ranked = _cirr_case()
    lines = {q.query_id: cirr.output_ranking(q, ranked[q.query_id], []) for q in queries}
    metrics = cirr.compute_metrics(queries, lines)
    third = 100 / 3
    expected = {"cirr/R@1": third, "cirr/R@5": third, "cirr/R@10": 2 * third, "cirr/R@50": 2 * third,
                "cirr/Rs@1": 2 * third, "cirr/Rs@2": 100.0, "cirr/Rs@3": 100.0, "cirr/avg": (third + 2 * third) / 2}
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    # The full rankings give the same numbers as the written lines.
    assert cirr.compute_metrics(queries, ranked) == pytest.approx(metrics)


def test_cirr_metric_errors_name_the_query():
    queries, ranked = _cirr_case()
    outside = _cirr_query("9", "g00", "g40", NAMES[0:6])  # target not an img_set member: a miss, as officially
    assert cirr.compute_metrics([outside], {"9": _ranked(["g40"])})["cirr/Rs@3"] == 0.0
    left_out = _cirr_query("7", "g00", "g05", NAMES[0:6])  # a member target the written line leaves out
    line = [n for n in NAMES if n != "g05"][:52] + ["g05"]  # g05 last: behind the 4 other members
    assert cirr.compute_metrics([left_out], {"7": line})["cirr/Rs@3"] == 0.0
    with pytest.raises(ValueError, match="'7'.*img_set member but its ranking does not list it"):
        cirr.compute_metrics([left_out], {"7": [n for n in line if n != "g05"]})
    small = _cirr_query("8", "g00", "g05", NAMES[0:6])  # a 12-image gallery lacking the target
    with pytest.raises(ValueError, match="'8'.*not in its ranking"):
        cirr.compute_metrics([small], {"8": NAMES[:5] + NAMES[6:12]})
    with pytest.raises(ValueError, match="'3' has no ranking"):
        cirr.compute_metrics(queries, {"1": ranked["1"], "2": ranked["2"]})
    with pytest.raises(ValueError, match="'1'.*twice"):
        cirr.compute_metrics(queries[:1], {"1": ["g03", "g03"] + NAMES[1:]})


def test_cirr_submission_files():
    queries, ranked = _cirr_case()
    test_queries = [_cirr_query(q.query_id, q.reference, None, q.subset) for q in queries]
    lines = {q.query_id: cirr.output_ranking(q, ranked[q.query_id], []) for q in test_queries}
    files = json.loads(json.dumps(cirr.submission_files(test_queries, lines)))
    recall, subset = files["cirr_recall.json"], files["cirr_recall_subset.json"]
    assert set(files) == {"cirr_recall.json", "cirr_recall_subset.json"}
    assert (recall["version"], recall["metric"]) == ("rc2", "recall")
    assert (subset["version"], subset["metric"]) == ("rc2", "recall_subset")
    assert set(recall) == set(subset) == {"version", "metric", "1", "2", "3"}
    assert recall["2"] == NAMES[20:60] + NAMES[0:10]  # top 50, reference g10 removed
    assert subset["2"] == ["g15", "g11", "g12"]
    assert recall["1"][:7] == ["g30", "g31", "g01", "g32", "g33", "g34", "g03"] and len(recall["1"]) == 50
    assert subset["1"] == ["g01", "g03", "g02"]
    assert all("g00" not in recall["1"] and len(v) == 3 for k, v in subset.items() if k.isdigit())


def test_cirr_fixture_perfect_ranking(tmp_path):
    write_cirr(str(tmp_path))
    release = cirr.read_release(str(tmp_path), "val")
    keys = [image.key for image in release.images]
    lines = {q.query_id: cirr.output_ranking(q, [q.targets[0]] + [k for k in keys if k != q.targets[0]],
                                             release.images) for q in release.queries}
    assert all(len(line) == 12 for line in lines.values())  # the whole 12-image gallery
    assert set(cirr.compute_metrics(release.queries, lines).values()) == {100.0}


# --- CIRCO reader ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_circo_reader(tmp_path, split):
    info = write_circo(str(tmp_path), split=split, broken=True)
    release = circo.read_release(str(tmp_path), split)
    assert [q.query_id for q in release.queries] == info["valid_query_ids"]
    _check_skips(release, info)
    ids = [int(image.key) for image in release.images]
    assert ids == sorted(ids) and len(ids) == info["num_images"] and 77777 not in ids
    assert all(image.image_id == image.key for image in release.images)
    by_key = {image.key: image for image in release.images}
    assert by_key["100"].path == "COCO2017_unlabeled/unlabeled2017/000000000100.jpg"  # the first entry of id 100
    for image in release.images:
        assert os.path.isfile(tmp_path / image.path) == (image.key != "99")
    q = {query.query_id: query for query in release.queries}
    assert q["2"].reference == "135" and q["2"].text == "caption 2"  # the first row of id 2, not the repeat
    assert q["2"].extra["shared_concept"] == "a thing"
    if split == "val":
        assert q["2"].targets == ("142", "149", "156") and q["0"].targets == ("107",)
        assert q["1"].extra["semantic_aspects"] == ["addition", "negation"]
    else:
        assert all(query.targets == () for query in release.queries)


def test_circo_target_first_and_inconsistent_target(tmp_path):
    write_circo(str(tmp_path))
    path = tmp_path / "annotations" / "val.json"
    rows = json.loads(path.read_text())
    rows[2]["target_img_id"] = rows[2]["gt_img_ids"][1]  # target listed second: moved first
    rows[3]["target_img_id"] = rows[0]["gt_img_ids"][0]  # not a gt of its own row
    path.write_text(json.dumps(rows))
    release = circo.read_release(str(tmp_path), "val")
    q = {query.query_id: query for query in release.queries}
    assert q["2"].targets == ("149", "142", "156")
    assert "3" not in q
    assert [(s.name, s.field, s.code) for s in release.skips] == [("3", "target_img_id", "inconsistent_field")]


def test_circo_layout_errors(tmp_path):
    with pytest.raises(ConversionError, match="annotations/val.json: missing"):
        circo.read_release(str(tmp_path), "val")
    write_circo(str(tmp_path))
    (tmp_path / "COCO2017_unlabeled/annotations/image_info_unlabeled2017.json").write_text("{not json")
    with pytest.raises(ConversionError, match="image_info_unlabeled2017.json: not valid JSON"):
        circo.read_release(str(tmp_path), "val")


# --- CIRCO protocol ----------------------------------------------------------------------------------------------

IDS = [str(1000 + i) for i in range(60)]


def _circo_case():
    """Hand-computed APs (CIRCO evaluation.py: precision at each relevant rank / min(|gt|, K)):
    a: gts at ranks 2, 4, 8 of 3 -> AP@5 = (1/2 + 2/4) / 3, AP@10.. = (1/2 + 2/4 + 3/8) / 3;
    b: its one gt first -> 1; c: one of 2 gts at rank 30, the other not in the top 50 -> AP@50 = (1/30) / 2."""
    a = Query("a", IDS[59], "t", targets=(IDS[1], IDS[3], IDS[7]))
    b = Query("b", IDS[59], "t", targets=(IDS[0],))
    c = Query("c", IDS[59], "t", targets=(IDS[29], IDS[55]))
    ranked = {"a": IDS, "b": IDS, "c": IDS}
    ap_a5, ap_a10 = (1 / 2 + 2 / 4) / 3, (1 / 2 + 2 / 4 + 3 / 8) / 3
    expected = {5: (ap_a5 + 1) / 3, 10: (ap_a10 + 1) / 3, 25: (ap_a10 + 1) / 3, 50: (ap_a10 + 1 + 1 / 60) / 3}
    return [a, b, c], ranked, {f"circo/mAP@{k}": 100 * v for k, v in expected.items()}


def test_circo_metrics_by_hand():
    queries, ranked, expected = _circo_case()
    lines = {q.query_id: circo.output_ranking(q, ranked[q.query_id], []) for q in queries}
    assert all(len(line) == 50 for line in lines.values())
    metrics = circo.compute_metrics(queries, lines)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    assert circo.average_precisions(IDS, ("x",)) == {5: 0.0, 10: 0.0, 25: 0.0, 50: 0.0}
    # More gts than K: divided by K, so seven gts at ranks 1-7 give AP@5 = 1 (not 5/7).
    assert circo.average_precisions(IDS, IDS[:7]) == {5: 1.0, 10: 1.0, 25: 1.0, 50: 1.0}
    # Gts at ranks 1, 3, 5, 7, 9, 11 (six): AP@5 = (1 + 2/3 + 3/5) / 5, AP@10 = (... + 4/7 + 5/9) / 6.
    odd = circo.average_precisions(IDS, IDS[0:12:2])
    assert odd[5] == pytest.approx((1 + 2 / 3 + 3 / 5) / 5)
    assert odd[10] == pytest.approx((1 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 9) / 6)
    assert odd[50] == pytest.approx((1 + 2 / 3 + 3 / 5 + 4 / 7 + 5 / 9 + 6 / 11) / 6)


def test_circo_reference_is_kept():
    query = Query("r", IDS[0], "t", targets=(IDS[1],))
    line = circo.output_ranking(query, IDS, [])
    assert line == IDS[:50] and line[0] == IDS[0]
    # Scored as written: the reference at rank 1 pushes the target to rank 2.
    assert circo.compute_metrics([query], {"r": line})["circo/mAP@5"] == pytest.approx(50.0)


def test_circo_metric_errors_name_the_query():
    queries, ranked, _ = _circo_case()
    with pytest.raises(ValueError, match="'a'.*twice"):
        circo.compute_metrics(queries, dict(ranked, a=[IDS[1], IDS[2], IDS[1]] + IDS[3:]))
    small = Query("s", IDS[0], "t", targets=(IDS[1], IDS[20]))  # a 14-image gallery lacking a gt
    with pytest.raises(ValueError, match="'s'.*not in its ranking"):
        circo.compute_metrics([small], {"s": IDS[:14]})
    with pytest.raises(ValueError, match="'c' has no ranking"):
        circo.compute_metrics(queries, {"a": IDS, "b": IDS})


def test_circo_submission_file(tmp_path):
    write_circo(str(tmp_path), split="test")
    release = circo.read_release(str(tmp_path), "test")
    keys = [image.key for image in release.images]
    lines = {q.query_id: circo.output_ranking(q, keys[::-1], release.images) for q in release.queries}
    files = json.loads(json.dumps(circo.submission_files(release.queries, lines)))
    assert list(files) == ["circo_test_submission.json"]
    submission = files["circo_test_submission.json"]
    assert set(submission) == {"0", "1", "2", "3", "4"}
    assert all(v == [int(k) for k in keys[::-1]] for v in submission.values())  # the whole 14-image gallery
    long = {q.query_id: circo.output_ranking(q, IDS, []) for q in release.queries}
    assert all(v == [int(i) for i in IDS[:50]] for v in circo.submission_files(release.queries, long)[
        "circo_test_submission.json"].values())
