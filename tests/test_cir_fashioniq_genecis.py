"""FashionIQ and GeneCIS benchmark modules: the readers on the released layouts (tiny fixtures), the caption join,
the crops, and the official metrics on hand-computed rankings."""

from __future__ import annotations

import os

import pytest

from cir_fixtures import (FASHIONIQ_EMPTY_CAPTION_QUERY, FASHIONIQ_SHARED_ASIN, FASHIONIQ_TEXTS,
                          GENECIS_REPEATED_TARGET_QUERY, GENECIS_TASKS, write_fashioniq, write_genecis)
from idmr_jax.tasks.cir import benchmarks
from idmr_jax.tasks.cir.benchmarks import fashioniq, genecis
from idmr_jax.tasks.cir.benchmarks.base import ConversionError, Image, Query


def _skips_by_name(release):
    return {s.name: (s.code, s.field, s.action) for s in release.skips}


def _expected_skips(info):
    """The fixture's broken records the reader reports (a missing image file is the converter's to report)."""
    return {name: (code, info["broken_fields"][name]) for name, code in info["broken"].items()
            if code != "missing_image_file"}


# --- FashionIQ ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["images", "resized_images"])
def test_fashioniq_reader_reads_both_layouts(tmp_path, layout):
    info = write_fashioniq(str(tmp_path), layout=layout, broken=True)
    release = fashioniq.read_release(str(tmp_path), "val")

    assert sorted(q.query_id for q in release.queries) == info["reader_query_ids"]
    skips = _skips_by_name(release)
    assert {k: v[:2] for k, v in skips.items()} == _expected_skips(info)
    assert skips["B0TOPTEE02"][2] == "entry_ignored" and skips["dress/3"][2] == "record_skipped"
    assert len(release.images) == info["reader_num_images"] == 19

    for category, asins in info["galleries"].items():  # one gallery per category, split-file order
        gallery = [img for img in release.images if img.group == category]
        assert [img.image_id for img in gallery] == asins
        assert [img.key for img in gallery] == [f"{category}/{a}" for a in asins]
    assert {img.key for img in release.images if img.image_id == FASHIONIQ_SHARED_ASIN} == {
        f"dress/{FASHIONIQ_SHARED_ASIN}", f"toptee/{FASHIONIQ_SHARED_ASIN}"}

    paths = {img.key: img.path for img in release.images}
    folder = "images" if layout == "images" else os.path.join("resized_images", "shirt")
    assert paths["shirt/B0SHIRT02"] == os.path.join(folder, "B0SHIRT02.png")  # extension found per image
    assert paths["toptee/B0TOPTEE03"].endswith("B0TOPTEE03.jpeg")
    for key, path in paths.items():
        assert os.path.isfile(tmp_path / path) == (key != "toptee/B0NOFILE"), key
    assert paths["toptee/B0NOFILE"].endswith("B0NOFILE.jpg")

    by_id = {q.query_id: q for q in release.queries}
    assert {qid: by_id[qid].text for qid in FASHIONIQ_TEXTS} == FASHIONIQ_TEXTS
    odd = by_id[FASHIONIQ_EMPTY_CAPTION_QUERY]  # one empty caption: a valid record, joined literally
    assert odd.text == " and is grey with a design on the back"
    assert odd.extra["captions"] == ["", "is grey with a design on the back"]
    dress0 = by_id["dress/0"]
    assert (dress0.reference, dress0.targets, dress0.group, dress0.candidates) == (
        "dress/B0DRESS01", ("dress/B0DRESS02",), "dress", None)
    assert (dress0.source, dress0.source_index) == (os.path.join("captions", "cap.dress.val.json"), 0)
    assert by_id["toptee/2"].reference == f"toptee/{FASHIONIQ_SHARED_ASIN}"
    assert len(release.sources) == 6 and release.counts["queries/toptee"] == 4


def test_fashioniq_test_split_has_no_targets(tmp_path):
    info = write_fashioniq(str(tmp_path), split="test", broken=True)
    release = fashioniq.read_release(str(tmp_path), "test")
    assert sorted(q.query_id for q in release.queries) == info["reader_query_ids"]
    assert all(q.targets == () for q in release.queries)
    assert {k: v[:2] for k, v in _skips_by_name(release).items()} == _expected_skips(info)
    assert fashioniq.submission_files(release.queries, {}) == {}


def test_fashioniq_missing_category_file_is_a_layout_error(tmp_path):
    write_fashioniq(str(tmp_path))
    os.remove(tmp_path / "captions" / "cap.shirt.val.json")
    with pytest.raises(ConversionError, match=r"cap\.shirt\.val\.json"):
        fashioniq.read_release(str(tmp_path), "val")


def test_fashioniq_caption_join_follows_clip4cir():
    assert fashioniq.join_captions("is Silver.", " fit and flare?") == "Is silver and fit and flare"
    assert fashioniq.join_captions("", "is red") == " and is red"
    assert fashioniq.join_captions("has stripes", "") == "Has stripes and "
    assert fashioniq.join_captions("  ,is long ", "has a belt..") == "Is long and has a belt"


def _fiq_query(qid, target=None):
    category = qid.split("/")[0]
    return Query(query_id=qid, reference=f"{category}/REF", text="t",
                 targets=(f"{category}/{target}",) if target else (), group=category)


def _ranking_with(target, position, length=50):
    ranking = [f"F{i}" for i in range(length)]
    if position is not None:
        ranking[position] = target
    return ranking


def test_fashioniq_metrics_by_hand():
    queries = [_fiq_query("dress/0", "A"), _fiq_query("dress/1", "B"), _fiq_query("dress/2", "C"),
               _fiq_query("shirt/0", "D"), _fiq_query("shirt/1", "E"), _fiq_query("toptee/0")]  # toptee: unlabelled
    rankings = {"dress/0": _ranking_with("A", 0), "dress/1": _ranking_with("B", 9),  # rank 10: inside R@10
                "dress/2": _ranking_with("C", 10),  # rank 11: R@50 only
                "shirt/0": _ranking_with("D", 49), "shirt/1": _ranking_with("E", None)}  # shirt/1: a miss
    metrics = fashioniq.compute_metrics(queries, rankings)
    assert metrics == pytest.approx({
        "fashioniq/dress/R@10": 200 / 3, "fashioniq/dress/R@50": 100.0,
        "fashioniq/shirt/R@10": 0.0, "fashioniq/shirt/R@50": 50.0,
        "fashioniq/avg/R@10": (200 / 3 + 0.0) / 2, "fashioniq/avg/R@50": 75.0})


def test_fashioniq_missing_ranking_names_the_query():
    queries = [_fiq_query("dress/0", "A"), _fiq_query("dress/1", "B")]
    with pytest.raises(ValueError, match="'dress/1'"):
        fashioniq.compute_metrics(queries, {"dress/0": ["A"]})
    with pytest.raises(ValueError, match="'dress/0'.*twice"):
        fashioniq.compute_metrics(queries[:1], {"dress/0": ["A", "X", "A"]})
    # A short ranking (the whole gallery) without the target: the gallery lacks it, an error naming the query.
    with pytest.raises(ValueError, match="'dress/0': target 'A' is not in its ranking of 2 images"):
        fashioniq.compute_metrics(queries[:1], {"dress/0": ["X", "Y"]})


def test_fashioniq_output_ranking_top50_asins_reference_kept():
    images = {f"dress/P{i}": Image(key=f"dress/P{i}", image_id=f"P{i}", path="", group="dress") for i in range(60)}
    query = Query(query_id="dress/0", reference="dress/P3", text="t", targets=("dress/P7",), group="dress")
    ranked = [f"dress/P{i}" for i in reversed(range(60))]
    assert fashioniq.output_ranking(query, ranked, images) == [f"P{i}" for i in reversed(range(10, 60))]
    assert "P3" in fashioniq.output_ranking(query, ["dress/P3", "dress/P7"], images)


# --- GeneCIS --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["coco_vg", "flat"])
def test_genecis_reader_per_query_galleries(tmp_path, layout):
    info = write_genecis(str(tmp_path), broken=True, layout=layout)
    release = genecis.read_release(str(tmp_path), "val")

    assert sorted(q.query_id for q in release.queries) == info["reader_query_ids"]
    assert {k: v[:2] for k, v in _skips_by_name(release).items()} == _expected_skips(info)
    by_id = {q.query_id: q for q in release.queries}
    for qid, (reference, candidates) in info["keys"].items():
        q = by_id[qid]
        assert (q.reference, q.candidates, q.targets) == (reference, candidates, (candidates[0],)), qid
        assert q.group == qid.split("/")[0] and q.text
    repeated = by_id[GENECIS_REPEATED_TARGET_QUERY]  # valid: two slots, one key
    assert repeated.candidates[0] == repeated.candidates[2] == "101" and len(repeated.candidates) == 5
    assert by_id["focus_object/0"].text == "dog"

    keys = [img.key for img in release.images]
    assert keys == sorted(set(keys)) and len(keys) == info["reader_num_images"]
    images = {img.key: img for img in release.images}
    # Hand-computed official boxes: the left/top clamp at 0 moves right/bottom (right = left + 1.7 w, not x + w).
    assert images["2001@0,0,34,34"].crop == (0.0, 0.0, 34.0, 34.0)
    assert images["2004@46.5,23.25,80.5,40.25"].crop == (46.5, 23.25, 80.5, 40.25)
    assert images["2001@0,0,34,34"].image_id == "2001" and images["101"].crop is None
    coco = os.path.join("coco", "val2017") if layout == "coco_vg" else "val2017"
    assert images["101"].path == os.path.join(coco, "000000000101.jpg")
    assert images["999"].path == os.path.join(coco, "000000000999.jpg")  # absent: the converter reports it
    assert images["2002@29,26,80,60"].path == ("vg/2002.jpg" if layout == "coco_vg" else "VG_100K_2/2002.jpg")
    for key, img in images.items():
        assert os.path.isfile(tmp_path / img.path) == (key != "999"), key
    assert images["101"].group == "focus_object"  # shared by both object tasks: listed once, first task's group


def test_genecis_missing_task_files(tmp_path):
    write_genecis(str(tmp_path))
    os.remove(tmp_path / "genecis" / "change_object.json")
    release = genecis.read_release(str(tmp_path), "val")
    assert not [q for q in release.queries if q.group == "change_object"]
    (skip,) = release.skips
    assert (skip.file, skip.code, skip.action) == (os.path.join("genecis", "change_object.json"), "missing_file",
                                                   "entry_ignored")
    for task in GENECIS_TASKS[:3]:
        os.remove(tmp_path / "genecis" / f"{task}.json")
    with pytest.raises(ConversionError, match="focus_attribute.json"):
        genecis.read_release(str(tmp_path), "val")


def test_genecis_widened_box():
    assert genecis.widened_box(10, 10, 20, 20) == (0.0, 0.0, 34.0, 34.0)
    assert genecis.widened_box(50, 40, 30, 20) == (29.0, 26.0, 80.0, 60.0)
    assert genecis.widened_box(60.5, 30.25, 20, 10) == (46.5, 23.25, 80.5, 40.25)


def _slot_query(qid, candidates):
    return Query(query_id=qid, reference="ref", text="c", targets=(candidates[0],), group=qid.split("/")[0],
                 candidates=tuple(candidates))


def test_genecis_metrics_on_per_query_galleries():
    queries = [_slot_query("focus_object/0", ["a", "b", "c", "d"]),
               _slot_query("focus_object/1", ["a", "b", "c", "d", "e"]),  # not the modal size: not scored
               _slot_query("focus_object/2", ["a", "b", "c", "d"]),
               _slot_query("change_object/0", ["a", "b", "c", "d"]),
               _slot_query("change_object/1", ["t", "x", "t", "y"])]  # target repeated at slot 2
    rankings = {"focus_object/0": ["0", "1", "2", "3"],  # rank 1
                "focus_object/1": ["4", "3", "2", "1", "0"],  # a miss, but discarded as the official loader does
                "focus_object/2": ["1", "0", "2", "3"],  # rank 2
                "change_object/0": ["3", "1", "0", "2"],  # rank 3
                "change_object/1": ["2", "1", "3", "0"]}  # only slot 0 is the target: rank 4, a miss
    metrics = genecis.compute_metrics(queries, rankings)
    assert metrics == pytest.approx({
        "genecis/focus_object/R@1": 50.0, "genecis/focus_object/R@2": 100.0, "genecis/focus_object/R@3": 100.0,
        "genecis/change_object/R@1": 0.0, "genecis/change_object/R@2": 0.0, "genecis/change_object/R@3": 50.0,
        "genecis/avg/R@1": 25.0})


def test_genecis_scores_the_modal_gallery_size_only():
    # datasets/coco_dataset.py / vaw_dataset.py: np.unique + argmax, so a tie goes to the smaller size.
    tie = [_slot_query("focus_attribute/0", ["a", "b", "c"]), _slot_query("focus_attribute/1", ["a", "b"])]
    assert [q.query_id for q in genecis.modal_queries(tie)] == ["focus_attribute/1"]
    most = tie + [_slot_query("focus_attribute/2", ["a", "b", "c"])]
    assert [q.query_id for q in genecis.modal_queries(most)] == ["focus_attribute/0", "focus_attribute/2"]
    unlabelled = Query(query_id="focus_attribute/3", reference="r", text="c", group="focus_attribute",
                       candidates=("a", "b", "c"))
    assert unlabelled not in genecis.modal_queries(most + [unlabelled])


def test_genecis_metrics_errors_name_the_query():
    queries = [_slot_query("focus_attribute/0", ["a", "b", "c"]), _slot_query("focus_attribute/1", ["a", "b", "c"])]
    with pytest.raises(ValueError, match="'focus_attribute/1'"):
        genecis.compute_metrics(queries, {"focus_attribute/0": ["0", "1", "2"]})
    with pytest.raises(ValueError, match="'focus_attribute/1'.*target slot"):
        genecis.compute_metrics(queries, {"focus_attribute/0": ["0", "1", "2"], "focus_attribute/1": ["1"]})


def test_genecis_output_ranking_writes_slots_unchanged():
    query = _slot_query("change_object/1", ["t", "x", "t", "y"] + [f"g{i}" for i in range(7)])
    ranked = ["10", "2", "0", "1", "3", "4", "5", "6", "7", "8", "9"]
    assert genecis.output_ranking(query, ranked, {}) == ranked
    with pytest.raises(ValueError, match="'change_object/1'"):
        genecis.output_ranking(query, ranked[:-1], {})
    assert genecis.RANKS_SLOTS is True and genecis.submission_files([query], {}) == {}


def test_registry_finds_both_modules():
    assert benchmarks.get("fashioniq") is fashioniq and benchmarks.get("genecis") is genecis
    assert (fashioniq.SPLITS, fashioniq.LABELLED_SPLITS) == (("val", "test"), ("val",))
    assert (genecis.SPLITS, genecis.LABELLED_SPLITS) == (("val",), ("val",))
