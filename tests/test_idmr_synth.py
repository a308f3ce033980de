"""IDMR data synthesis: exact skip accounting, crop pixels, captions, splits, determinism, resume, CLI, sources.

A small COCO-format dataset is built on the fly from scikit-image's real photographs with hand-set boxes, one for
each kind of instance the synthesis must drop (too small, crowd, out of bounds, area ratio) and each kind of bad
input it must report (broken / missing image, size mismatch, unsafe path, bad annotation records).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil

import numpy as np
import pytest
import skimage.data
from PIL import Image

from data_prep import idmr_synth as synth_cli
from idmr_jax.tasks.idmr.synth import captions, geometry, synthesis
from idmr_jax.tasks.idmr.synth.sources import demo_coco, load_coco
from idmr_jax.tasks.idmr import records as triplets

CATEGORIES = ["person", "flag", "cup", "spoon", "saucer", "cat", "rocket", "coin"]
CAT = {name: i + 1 for i, name in enumerate(CATEGORIES)}
KEPT = ["101", "102", "201", "202", "301", "401"]
# annotation id -> skip code (one entry per annotation the synthesis must drop)
EXPECTED_SKIPS = {"103": "too_small", "302": "too_small", "104": "crowd", "203": "box_outside",
                  "204": "area_ratio_high", "402": "area_ratio_low", "403": "box_nonfinite",
                  "501": "unusable_image", "601": "unusable_image", "701": "unusable_image",
                  "901": "unusable_image", "801": "unknown_image", "802": "unknown_category", "803": "box_empty"}


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).resize(size, Image.Resampling.LANCZOS)


def build_coco(root: str) -> dict:
    """Writes images + annotations.json under ``root``; returns the facts the tests check against."""
    img_dir = os.path.join(root, "images")
    os.makedirs(os.path.join(img_dir, "sub"))
    photos = {"astro.jpg": ("astronaut", (256, 256), "JPEG"), "sub/coffee.png": ("coffee", (300, 200), "PNG"),
              "chelsea.jpg": ("chelsea", (226, 150), "JPEG"), "rocket.jpg": ("rocket", (640, 427), "JPEG")}
    for fn, (name, size, fmt) in photos.items():
        _photo(name, size).save(os.path.join(img_dir, fn), format=fmt, quality=90)
    good = open(os.path.join(img_dir, "chelsea.jpg"), "rb").read()
    open(os.path.join(img_dir, "broken.jpg"), "wb").write(good[: len(good) // 2])
    shutil.copy(os.path.join(img_dir, "chelsea.jpg"), os.path.join(img_dir, "mismatch.jpg"))
    images = [{"id": 1, "file_name": "astro.jpg", "width": 256, "height": 256},
              {"id": 2, "file_name": "sub/coffee.png", "width": 300, "height": 200},
              {"id": 3, "file_name": "chelsea.jpg", "width": 226, "height": 150},
              {"id": 4, "file_name": "rocket.jpg", "width": 640, "height": 427},
              {"id": 5, "file_name": "broken.jpg", "width": 226, "height": 150},
              {"id": 6, "file_name": "missing.jpg", "width": 100, "height": 100},
              {"id": 7, "file_name": "mismatch.jpg", "width": 300, "height": 150},
              {"id": 8, "file_name": "../escape.jpg", "width": 100, "height": 100}]

    def ann(aid, iid, cat, bbox, crowd=0):
        return {"id": aid, "image_id": iid, "category_id": CAT[cat], "bbox": bbox, "iscrowd": crowd, "area": 0}

    annotations = [
        ann(101, 1, "person", [70, 10, 150, 240]), ann(102, 1, "flag", [0, 0, 60, 90]),
        ann(103, 1, "coin", [5, 200, 10, 10]), ann(104, 1, "person", [150, 150, 60, 60], crowd=1),
        ann(201, 2, "cup", [75, 30, 150, 125]), ann(202, 2, "spoon", [250, 150, 100, 80]),
        ann(203, 2, "spoon", [400, 10, 30, 30]), ann(204, 2, "saucer", [0, 0, 300, 200]),
        ann(301, 3, "cat", [40, 10, 140, 135]), ann(302, 3, "coin", [0, 0, 20, 200]),
        ann(401, 4, "rocket", [280, 20, 100, 380]), ann(402, 4, "coin", [10, 10, 40, 40]),
        ann(403, 4, "coin", [1, 2, float("nan"), 3]),
        ann(501, 5, "cat", [10, 10, 100, 100]), ann(601, 6, "cat", [10, 10, 50, 50]),
        ann(701, 7, "cat", [10, 10, 100, 100]), ann(901, 8, "cat", [10, 10, 50, 50]),
        ann(801, 99, "cat", [10, 10, 50, 50]), {**ann(802, 1, "cat", [10, 10, 50, 50]), "category_id": 77},
        ann(803, 1, "cat", [10, 10, 0, 20]), ann(101, 1, "cat", [0, 0, 50, 50]), "not a record",
    ]
    categories = [{"id": CAT[c], "name": c} for c in CATEGORIES] + [{"id": 99}]
    path = os.path.join(root, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)  # NaN as a bare token
    return {"annotations": path, "images": img_dir, "n_annotations": len(annotations), "photos": photos,
            "boxes": {str(a["id"]): a["bbox"] for a in annotations[:-2] if isinstance(a, dict)},
            "files": {1: "astro.jpg", 2: "sub/coffee.png", 3: "chelsea.jpg", 4: "rocket.jpg"}}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return build_coco(str(tmp_path_factory.mktemp("coco")))


@pytest.fixture(scope="module")
def synth(coco, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth"))
    loaded = load_coco(coco["annotations"], coco["images"])
    return out, synthesis.synthesize(loaded, out, options=synthesis.SynthOptions(records_per_shard=4))


def _files(out: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
            if n.endswith(".array_record") or n in (synthesis.MANIFEST, synthesis.REPORT)}


def test_every_instance_is_accounted_for_by_reason(coco, synth):
    out, result = synth
    counts = result.manifest["counts"]
    want = {}
    for code in EXPECTED_SKIPS.values():
        want[code] = want.get(code, 0) + 1
    want.update({"duplicate_id": 1, "bad_type": 1})
    assert counts["instances"] == {"total": coco["n_annotations"], "kept": len(KEPT), "skipped": want}
    assert counts["triplets"] == {"train": 6, "val": 0} and counts["boxes_clipped"] == 1  # the spoon
    report = json.load(open(os.path.join(out, synthesis.REPORT)))
    assert report == json.loads(json.dumps(result.report))
    assert report["filtered"]["too_small"] == ["coco:103", "coco:302"] and report["filtered"]["crowd"] == ["coco:104"]
    # Bad input is itemised with file, record (list + position), id and field.
    items = {(s["record"], s["index"], s["name"], s["field"], s["code"]) for s in report["skipped"]}
    assert ("annotations", 12, "403", "bbox", "box_nonfinite") in items
    assert ("annotations", 6, "203", "bbox", "box_outside") in items
    assert ("images", 4, "broken.jpg", "file_name", "undecodable_image") in items
    assert ("images", 5, "missing.jpg", "file_name", "missing_image") in items
    assert ("images", 6, "mismatch.jpg", "width", "image_size_mismatch") in items
    assert ("images", 7, "../escape.jpg", "file_name", "unsafe_path") in items
    assert ("annotations", 20, "101", "id", "duplicate_id") in items
    assert ("annotations", 21, None, "(record)", "bad_type") in items
    assert ("categories", 8, None, "id", "bad_type") not in items  # id 99 is fine; its missing name is the issue
    assert ("categories", 8, "99", "name", "bad_type") in items
    assert all(s["file"] == coco["annotations"] for s in report["skipped"])


def test_triplets_hold_the_right_pixels(coco, synth):
    out, result = synth
    recs = triplets.read_shards(os.path.join(out, "train-*.array_record"))
    assert [r.annotation_id for r in recs] == [f"coco:{a}" for a in KEPT]
    for r in recs:
        aid = r.annotation_id.split(":")[1]
        image_no = int(aid[0])
        path = os.path.join(coco["images"], coco["files"][image_no])
        src = Image.open(path)
        w, h = src.size
        assert r.image_size == (w, h) and r.image_id == f"coco:{image_no}" and r.instance_id == r.annotation_id
        x, y, bw, bh = coco["boxes"][aid]
        box = (max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h))
        assert r.box == box and r.crop_box == box  # integer boxes, no padding: the crop is the box
        region = src.convert("RGB").crop(tuple(int(v) for v in box))
        # Independent reference: the same region through PIL's encoder with the documented settings.
        buf = io.BytesIO()
        region.save(buf, format="JPEG", quality=95, subsampling=0)
        crop = np.asarray(Image.open(io.BytesIO(r.crop_jpeg)))
        np.testing.assert_array_equal(crop, np.asarray(Image.open(buf)))
        assert np.abs(crop.astype(float) - np.asarray(region, float)).mean() < 3.0
        if path.endswith(".jpg"):
            assert r.image_jpeg == open(path, "rb").read()  # JPEG sources are stored as their own bytes
        else:
            full = np.asarray(Image.open(io.BytesIO(r.image_jpeg)))
            assert Image.open(io.BytesIO(r.image_jpeg)).format == "JPEG"
            assert np.abs(full.astype(float) - np.asarray(src.convert("RGB"), float)).mean() < 3.0
        assert r.category == CATEGORIES[CAT[r.category] - 1] and r.source == "coco" and r.captioner == "template"
        assert r.clip_score is None and r.source_index == next(
            i for i, a in enumerate(json.load(open(coco["annotations"]))["annotations"]) if a["id"] == int(aid))


def test_template_captions_describe_position_and_neighbours(synth):
    out, _ = synth
    recs = {r.annotation_id: r for r in triplets.read_shards(os.path.join(out, "train-*.array_record"))}
    person, flag = recs["coco:101"].caption, recs["coco:102"].caption
    assert any(p in person for p in captions.POSITION_PHRASES[("center", "middle")]), person
    assert "another person" in person and "a flag" in person and "a coin" in person, person
    assert any(p in flag for p in captions.POSITION_PHRASES[("left", "top")]), flag
    assert "left of two people" in flag and "a coin" in flag and "flag" not in flag, flag
    # The rocket's neighbours: a coin dropped as too small for a crop is still a landmark; the NaN box is not.
    assert "right of a coin" in recs["coco:401"].caption and "coins" not in recs["coco:401"].caption
    alone = recs["coco:301"].caption  # the cat's only neighbour (a 20 px strip) is a landmark too
    assert "coin" in alone
    req = captions.CaptionRequest("k", "cat", (40.0, 10.0, 180.0, 145.0), 226, 150)
    assert any(p in captions.TemplateCaptioner(0).caption(req) for p in ("nothing else", "on its own", "alone"))
    # Deterministic per seed, different phrasings across seeds.
    req = captions.CaptionRequest("coco:101", "person", (70.0, 10.0, 220.0, 250.0), 256, 256,
                                  (("flag", (0.0, 0.0, 60.0, 90.0)),))
    assert captions.TemplateCaptioner(0).caption(req) == captions.TemplateCaptioner(0).caption(req)
    assert len({captions.TemplateCaptioner(s).caption(req) for s in range(12)}) > 2


def test_manifest_counts_equal_records_and_output_is_deterministic(coco, synth, tmp_path):
    out, result = synth
    m = json.load(open(os.path.join(out, synthesis.MANIFEST)))
    assert m == json.loads(json.dumps(result.manifest))
    assert len(m["shards"]["train"]) == 2 and m["shards"]["val"] == []
    assert sum(s["records"] for s in m["shards"]["train"]) == m["counts"]["triplets"]["train"]
    for s in m["shards"]["train"]:
        assert len(triplets.read_shards([os.path.join(out, s["file"])])) == s["records"]
    again = str(tmp_path / "again")
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), again,
                          options=synthesis.SynthOptions(records_per_shard=4))
    assert _files(again) == _files(out)  # byte-identical in a fresh folder
    resumed = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), again,
                                    options=synthesis.SynthOptions(records_per_shard=4))
    assert resumed.written == [] and len(resumed.reused) == 2 and _files(again) == _files(out)
    os.remove(os.path.join(again, "train-00001-of-00002.array_record"))
    redone = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), again,
                                   options=synthesis.SynthOptions(records_per_shard=4))
    assert redone.written == ["train-00001-of-00002.array_record"] and _files(again) == _files(out)


def test_parallel_workers_write_the_same_bytes(coco, synth, tmp_path):
    out = str(tmp_path / "parallel")
    res = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out,
                                options=synthesis.SynthOptions(records_per_shard=4), workers=2)
    assert len(res.written) == 2 and _files(out) == _files(synth[0])


def test_triplet_schema_round_trip_and_errors():
    import msgpack

    rec = triplets.TripletRecord(
        crop_jpeg=b"\xff\xd8c", image_jpeg=b"\xff\xd8i", caption="left of a dog", category="cat", instance_id="i",
        annotation_id="coco:1", image_id="coco:2", box=(1.0, 2.0, 5.5, 6.0), crop_box=(1.0, 2.0, 6.0, 6.0),
        image_size=(10, 8), source="coco", captioner="template", clip_score=0.25, source_index=3)
    assert triplets.decode(triplets.encode(rec)) == rec
    assert triplets.decode(triplets.encode(dataclasses.replace(rec, clip_score=None))).clip_score is None
    with pytest.raises(triplets.RecordError, match="field 'box'.*outside"):
        triplets.encode(dataclasses.replace(rec, box=(0.0, 0.0, 11.0, 8.0)))
    with pytest.raises(triplets.RecordError, match="field 'caption': empty"):
        triplets.encode(dataclasses.replace(rec, caption=" "))
    raw = msgpack.unpackb(triplets.encode(rec))
    for change, field in ((dict(version=2), "version"), (dict(kind="query"), "kind"), (dict(extra=1), "extra"),
                          (dict(image_size=[10]), "image_size"), (dict(clip_score=float("nan")), "clip_score"),
                          (dict(crop_box=[1, 2, 1, 6]), "crop_box"), (dict(source_index=True), "source_index")):
        with pytest.raises(triplets.RecordError) as err:
            triplets.decode(msgpack.packb({**raw, **change}, use_bin_type=True))
        assert err.value.field == field and f"field '{field}'" in str(err.value)
    del raw["caption"]
    with pytest.raises(triplets.RecordError, match="field 'caption': missing"):
        triplets.decode(msgpack.packb(raw, use_bin_type=True))


def test_context_padding_and_max_side(coco, tmp_path):
    opts = synthesis.SynthOptions(filters=geometry.FilterSpec(context_pad=0.25), max_side=128)
    out = str(tmp_path / "pad")
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, options=opts)
    recs = {r.annotation_id: r for r in triplets.read_shards(os.path.join(out, "train-*"))}
    r = recs["coco:201"]  # cup [75, 30, 225, 155] in a 300x200 image, padded by 37.5 / 31.25 px a side
    assert geometry.crop_rect((75.0, 30.0, 225.0, 155.0), 300, 200, 0.25) == (37, 0, 263, 187)
    assert r.image_size == (128, 85) and Image.open(io.BytesIO(r.image_jpeg)).size == (128, 85)
    np.testing.assert_allclose(r.box, (75 * 128 / 300, 30 * 85 / 200, 225 * 128 / 300, 155 * 85 / 200))
    np.testing.assert_allclose(r.crop_box, (37 * 128 / 300, 0, 263 * 128 / 300, 187 * 85 / 200))
    assert Image.open(io.BytesIO(r.crop_jpeg)).size == (226, 187)  # cut at source resolution


@pytest.mark.parametrize("split_by", ["image", "instance", "category"])
def test_val_split_is_disjoint(coco, tmp_path, split_by):
    out = str(tmp_path / split_by)
    opts = synthesis.SynthOptions(val_fraction=0.4, split_by=split_by, seed=3)
    m = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, options=opts).manifest
    train = triplets.read_shards(os.path.join(out, "train-*"))
    val = triplets.read_shards(os.path.join(out, "val-*"))
    assert len(train) + len(val) == len(KEPT) and val and train
    assert m["counts"]["triplets"] == {"train": len(train), "val": len(val)}
    field = {"image": "image_id", "instance": "instance_id", "category": "category"}[split_by]
    assert not {getattr(r, field) for r in train} & {getattr(r, field) for r in val}


def test_assign_splits_fractions():
    keys = [f"k{i}" for i in range(100)]
    sides = synthesis.assign_splits(keys, 0.1, seed=0)
    assert sides.count("val") == 10 and sides == synthesis.assign_splits(keys, 0.1, seed=0)
    assert sides != synthesis.assign_splits(keys, 0.1, seed=1)
    cats = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    side = synthesis.assign_splits(cats, 0.25, seed=0, by_category=True)
    per = {c: {s for c2, s in zip(cats, side) if c2 == c} for c in "abc"}
    assert all(len(v) == 1 for v in per.values()) and side.count("val") >= 25 and "train" in side


class KnownScores:
    """A scorer with fixed scores per category: checks the filter keeps exactly the scores above the threshold."""

    name = "known"
    SCORES = {"person": 0.31, "flag": 0.2, "cup": 0.25, "spoon": 0.05, "cat": 0.21, "rocket": 0.19}

    def __init__(self):
        self.calls = []

    def score(self, crops, texts):
        self.calls.append(list(texts))
        assert all(isinstance(c, Image.Image) and c.mode == "RGB" for c in crops)
        return np.array([self.SCORES[t.removeprefix("a photo of a ")] for t in texts])


def test_clip_threshold_filters(coco, tmp_path):
    scorer = KnownScores()
    out = str(tmp_path / "clip")
    res = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, scorer=scorer)
    kept = {r.category: r.clip_score for r in triplets.read_shards(os.path.join(out, "train-*"))}
    assert kept == {"person": 0.31, "cup": 0.25, "cat": 0.21}  # strictly above 0.2 (the paper's rule)
    assert res.report["filtered"]["clip_score_low"] == ["coco:102", "coco:202", "coco:401"]
    assert res.manifest["counts"]["instances"]["skipped"]["clip_score_low"] == 3
    assert res.report["clip"]["scored"] == 6 and res.report["clip"]["threshold"] == 0.2
    assert "a photo of a person" in scorer.calls[0]
    # Scores are cached per scorer: a rerun asks for nothing.
    again = KnownScores()
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, scorer=again)
    assert again.calls == []


def test_mllm_captioner_sees_a_green_box(coco, tmp_path):
    seen = []

    def generate(image, prompt):
        seen.append((np.asarray(image), prompt))
        return f'  "The marked thing is near object {len(seen)}."\n'

    cap = captions.MllmCaptioner(generate, "fake")
    out = str(tmp_path / "mllm")
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, captioner=cap)
    recs = triplets.read_shards(os.path.join(out, "train-*"))
    assert [r.caption for r in recs] == [f"The marked thing is near object {i + 1}." for i in range(6)]
    assert {r.captioner for r in recs} == {"mllm:fake"} and seen[0][1] == captions.DEFAULT_PROMPT
    # The person [70, 10, 220, 250] in the 256 px astro.jpg: a 2 px green outline just outside the box, so the
    # object's own pixels (columns 70..219) are untouched.
    green = lambda px: bool((px == (0, 255, 0)).all())  # noqa: E731
    img = seen[0][0]
    assert all(green(img[130, x]) for x in (68, 69, 220, 221)) and all(green(img[y, 145]) for y in (8, 9, 250, 251))
    assert not any(green(img[130, x]) for x in (67, 70, 145, 219, 222))
    # Captions are cached: a rerun does not call the model again.
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, captioner=cap)
    assert len(seen) == 6


def test_strict_and_cli_exit_codes(coco, tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["--annotations", coco["annotations"], "--images", coco["images"], "--out", out]
    assert synth_cli.main(argv + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert f"{coco['annotations']}: annotations[12] ('403'), field 'bbox': box has non-finite" in err
    assert "images[4] ('broken.jpg'), field 'file_name'" in err
    assert not [n for n in os.listdir(out) if n.endswith(".array_record")]
    assert synth_cli.main(argv + ["--val-fraction", "0.3", "--limit-images", "3"]) == 0
    m = json.load(open(os.path.join(out, synthesis.MANIFEST)))
    assert m["counts"]["instances"]["kept"] == 5 and m["counts"]["instances"]["skipped"]["beyond_limit"] == 5
    with pytest.raises(SystemExit) as e:
        synth_cli.main(["--annotations", coco["annotations"], "--out", out])  # no --images
    assert e.value.code == 2
    assert synth_cli.main(["--annotations", str(tmp_path / "nope.json"), "--images", ".", "--out", out]) == 2


def test_demo_benchmark_source_keeps_instance_identity(tmp_path):
    from idmr_jax.data.demo_bench.builder import build_demo_benchmark

    root = build_demo_benchmark(tmp_path / "demo", size="tiny")
    coco, image_dir = demo_coco(str(root), "val")
    assert all(a["instance_id"] for a in coco["annotations"])
    out = str(tmp_path / "demo_out")
    res = synthesis.synthesize(synthesis.load_demo(str(root), "val"), out,
                                options=synthesis.SynthOptions(filters=synthesis.DEMO_FILTERS))
    recs = triplets.read_shards(os.path.join(out, "train-*"))
    meta = json.load(open(root / "demo_meta.json"))
    assert len(recs) == len(coco["images"]) == res.manifest["counts"]["triplets"]["train"]
    by_name = {f"images/{m['instance']}/{n}.jpg": m for n, m in meta["images"].items()}
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    for r in recs:
        m = by_name[names[int(r.image_id.split(":")[1])]]
        assert r.instance_id == f"demo:{m['instance']}" and r.box == tuple(map(float, m["box"]))
        assert meta["contexts"][m["context"]]["description"] in r.caption
    assert len({r.instance_id for r in recs}) < len(recs)  # the same instance appears in several images
    # The CLI picks the demo filters by itself and writes the same triplets.
    cli = str(tmp_path / "demo_cli")
    assert synth_cli.main(["--demo-root", str(root), "--demo-split", "val", "--out", cli]) == 0
    assert _files(cli)["train-00000-of-00001.array_record"] == _files(out)["train-00000-of-00001.array_record"]


# --- TFDS-prepared COCO (ArrayRecord, read without TensorFlow) ----------------------------------------------------

import tensorflow_datasets as tfds  # noqa: E402  (only the TFDS tests below need it)

TFDS_OBJECTS = {  # file -> [(category, COCO bbox, crowd)]: in-bounds boxes (BBoxFeature holds [0, 1] values)
    "astro.jpg": [("person", [70, 10, 150, 240], 0), ("flag", [0, 0, 60, 90], 0), ("coin", [5, 200, 10, 10], 0),
                  ("person", [150, 150, 60, 60], 1)],
    "sub/coffee.png": [("cup", [75, 30, 150, 125], 0)],
    "chelsea.jpg": [("cat", [40, 10, 140, 135], 0)],
    "broken.jpg": [("cat", [10, 10, 100, 100], 0)],
}


class IdmrSynthTestCoco(tfds.core.GeneratorBasedBuilder):
    """A tiny stand-in for tfds' coco/2017 with the same feature layout, built from the test photos."""

    VERSION = tfds.core.Version("1.0.0")
    images_dir = None  # set by the test before building

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64, "area": np.int64, "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=CATEGORIES), "is_crowd": np.bool_}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for k, (fn, objects) in enumerate(TFDS_OBJECTS.items()):
            data = open(os.path.join(self.images_dir, fn), "rb").read()
            if fn.endswith(".png"):  # the Image feature stores JPEG here, as coco/2017 does
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
            w, h = (226, 150) if fn == "broken.jpg" else Image.open(io.BytesIO(data)).size
            yield k, {"image": data, "image/filename": fn, "image/id": 100 + k, "objects": {
                "id": [1000 * (k + 1) + j for j in range(len(objects))], "area": [0] * len(objects),
                "bbox": np.array([[y / h, x / w, (y + bh) / h, (x + bw) / w] for _, (x, y, bw, bh), _ in objects],
                                 np.float32).reshape(-1, 4),
                "label": [CAT[c] - 1 for c, _, _ in objects], "is_crowd": [bool(c) for _, _, c in objects]}}


def test_tfds_source_matches_the_coco_source(coco, synth, tmp_path):
    from idmr_jax.tasks.idmr.synth.sources import load_tfds

    data_dir = str(tmp_path / "tfds")
    IdmrSynthTestCoco.images_dir = coco["images"]
    IdmrSynthTestCoco(data_dir=data_dir, file_format="array_record").download_and_prepare()
    loaded = load_tfds("idmr_synth_test_coco", "train", data_dir)
    assert loaded.counts == {"images": 4, "annotations": 7, "categories": len(CATEGORIES)}
    out = str(tmp_path / "out")
    res = synthesis.synthesize(loaded, out)
    assert res.manifest["counts"]["instances"] == {
        "total": 7, "kept": 4, "skipped": {"crowd": 1, "too_small": 1, "unusable_image": 1}}
    # TFDS shuffles examples on writing: the report names the example by its index in the data source.
    broken = next(i for i in range(4) if loaded.reader.source()[i]["image/filename"] == b"broken.jpg")
    assert [(s["record"], s["index"], s["name"], s["field"], s["code"]) for s in res.report["skipped"]] == [
        ("examples", broken, "broken.jpg", "image", "undecodable_image"),
        ("examples", broken, "4000", "objects[0]", "unusable_image")]
    recs = triplets.read_shards(os.path.join(out, "train-*"))
    ref = {r.annotation_id: r for r in triplets.read_shards(os.path.join(synth[0], "train-*"))}
    coco_of = {"person": "101", "flag": "102", "cup": "201", "cat": "301"}
    assert sorted(r.category for r in recs) == sorted(coco_of)
    for r in recs:
        c = ref[f"coco:{coco_of[r.category]}"]
        assert r.source == "tfds:idmr_synth_test_coco" and r.caption
        np.testing.assert_allclose(r.box, c.box, atol=1e-3)
        assert r.crop_box == c.crop_box  # the float32 noise of normalised boxes does not widen the crop
        if r.category != "cup":  # the PNG was re-encoded for TFDS; the JPEGs are the same bytes
            assert r.image_jpeg == c.image_jpeg and r.crop_jpeg == c.crop_jpeg
    person = next(r for r in recs if r.category == "person")
    assert person.annotation_id == "tfds:idmr_synth_test_coco:1000" and person.image_id.endswith(":100")
    assert "another person" in person.caption and "a flag" in person.caption
    cli_out = str(tmp_path / "cli")
    assert synth_cli.main(["--tfds-name", "idmr_synth_test_coco", "--tfds-data-dir", data_dir, "--split", "train",
                            "--out", cli_out]) == 0
    assert _files(cli_out)["train-00000-of-00001.array_record"] == _files(out)["train-00000-of-00001.array_record"]


# --- the real CLIP path: a tiny random transformers CLIPModel + tokenizer, loaded into the Flax port ------------


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the base alphabet of a byte-level BPE vocabulary."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _save_tiny_clip(folder: str):
    """A CLIP BPE tokenizer (byte alphabet, three merges) and a random tiny CLIPModel, saved together."""
    import torch
    import transformers

    chars = _byte_chars()
    merges = ["p h", "ph o", "t o</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder)
    json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(folder, "vocab.json"), "w"))
    open(os.path.join(folder, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(vocab=os.path.join(folder, "vocab.json"),
                                     merges=os.path.join(folder, "merges.txt"))
    tok.save_pretrained(folder)
    eot = len(vocab) - 1
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=24, eos_token_id=eot, pad_token_id=eot,
                bos_token_id=eot - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                  patch_size=14)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                        projection_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "embedding" in name else 0.05))
    hf.save_pretrained(folder)
    return hf, tok


@pytest.mark.slow  # torch + transformers imports and two jit compiles: ~10 s idle, ~30 s on 2 busy cores
def test_clip_scorer_matches_transformers_and_filters(coco, tmp_path):
    import torch
    import transformers

    from idmr_jax.tasks.idmr.synth.clip_filter import ClipScorer, clip_pixels

    folder = str(tmp_path / "clip")
    hf, tok = _save_tiny_clip(folder)
    scorer = ClipScorer(folder, batch_size=4)
    crops = [_photo(n, s) for n, s in (("astronaut", (80, 120)), ("coffee", (90, 60)), ("chelsea", (57, 57)),
                                       ("rocket", (40, 75)), ("coffee", (200, 33)))]
    texts = [f"a photo of a {c}" for c in ("person", "cup", "cat", "rocket", "spoon")]
    # Preprocessing equals CLIPImageProcessor's (shorter side -> 56, bicubic, centre crop, CLIP mean/std).
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    want_px = proc(images=crops, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(clip_pixels(crops, 56), want_px, atol=1e-5)
    got = scorer.score(crops, texts)  # two batches: 4 + a padded 1
    t = tok(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = hf(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                 pixel_values=torch.from_numpy(want_px.transpose(0, 3, 1, 2).copy()))
        img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        want = (img * txt).sum(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got.std() > 1e-3  # the random model separates the pairs: a threshold can split them

    # End to end: a threshold at the median of the six candidates' scores keeps exactly those above it.
    probe = str(tmp_path / "probe")
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), probe, scorer=scorer,
                          options=synthesis.SynthOptions(clip_threshold=-2.0))
    scores = {r.annotation_id: r.clip_score for r in triplets.read_shards(os.path.join(probe, "train-*"))}
    assert len(scores) == 6
    threshold = float(np.median(list(scores.values())))
    out = str(tmp_path / "filtered")
    res = synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out, scorer=scorer,
                                options=synthesis.SynthOptions(clip_threshold=threshold))
    kept = {r.annotation_id: r.clip_score for r in triplets.read_shards(os.path.join(out, "train-*"))}
    assert kept == {k: v for k, v in scores.items() if v > threshold} and len(kept) == 3
    assert sorted(res.report["filtered"]["clip_score_low"]) == sorted(set(scores) - set(kept))
    # The recorded scores are the transformers model's on the same crops.
    region = Image.open(os.path.join(coco["images"], "astro.jpg")).convert("RGB").crop((70, 10, 220, 250))
    pix = torch.from_numpy(clip_pixels([region], 56).transpose(0, 3, 1, 2).copy())
    t = tok(["a photo of a person"], padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        o = hf(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=pix)
        ref = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).item()
    assert abs(scores["coco:101"] - ref) < 1e-4


# --- the MLLM captioner on the project's LLaVA port: a tiny random LLaVA + a word-level tokenizer -----------------

LLAVA_VOCAB, LLAVA_IMAGE = 64, 63


def _save_tiny_llava(folder: str):
    import tokenizers
    import torch
    import transformers

    words = ["<unk>", "<pad>", "</s>", "<s>", "USER", "ASSISTANT", ":", ".", ",", "the", "object", "in", "green",
             "box", "is", "next", "to", "a", "on", "left", "right", "of", "image", "describe", "where", "it"]
    words += [f"w{i}" for i in range(LLAVA_IMAGE - len(words))]
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                               eos_token="</s>", bos_token="<s>")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    text = transformers.Qwen2Config(vocab_size=LLAVA_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE, image_seq_length=4)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name and "patch" not in name else 0.08))
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return hf, tok


@pytest.mark.slow  # torch + transformers imports, LLaVA load and generate compiles: ~30 s on 2 busy cores
def test_llava_captioner_matches_transformers_generate(coco, tmp_path):
    import torch

    folder = str(tmp_path / "llava")
    hf, tok = _save_tiny_llava(folder)
    generate, name = captions.llava_generate(folder, max_new_tokens=6)
    assert name == "mllm:llava:llava" and generate.num_image_tokens == 4
    image = captions.draw_marker(_photo("chelsea", (226, 150)), (40.0, 10.0, 180.0, 145.0))
    got = generate(image, captions.DEFAULT_PROMPT)
    ids = generate.prompt_ids(captions.DEFAULT_PROMPT)
    assert ids.count(LLAVA_IMAGE) == 4 and ids[:2] == tok("USER :")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          pixel_values=torch.from_numpy(generate.pixels(image).transpose(0, 3, 1, 2).copy()),
                          max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in ref:
        ref = ref[: ref.index(tok.eos_token_id)]
    assert got == tok.decode(ref, skip_special_tokens=True) and got.strip()
    # End to end through the synthesis: each caption is the model's answer for that image with its box drawn.
    out = str(tmp_path / "out")
    synthesis.synthesize(load_coco(coco["annotations"], coco["images"]), out,
                          captioner=captions.MllmCaptioner(generate, name),
                          options=synthesis.SynthOptions(limit_images=3))
    recs = triplets.read_shards(os.path.join(out, "train-*"))
    cat = next(r for r in recs if r.category == "cat")
    marked = captions.draw_marker(Image.open(os.path.join(coco["images"], "chelsea.jpg")), cat.box)
    assert cat.caption == captions.clean_caption(generate(marked, captions.DEFAULT_PROMPT))
    assert {r.captioner for r in recs} == {name}


def test_tfds_builder_repacks_the_synthesis(synth, tmp_path):
    from data_prep.tfds_idmr_synth import IdmrSynth, prepare

    out, _ = synth
    data_dir = str(tmp_path / "tfds_out")
    prepare(out, data_dir)
    want = triplets.read_shards(os.path.join(out, "train-*"))
    ds = tfds.data_source("idmr_synth", split="train", data_dir=data_dir,
                          decoders={"crop": tfds.decode.SkipDecoding(), "image": tfds.decode.SkipDecoding()})
    assert len(ds) == len(want) and IdmrSynth.name == "idmr_synth"
    for r, ex in zip(want, (ds[i] for i in range(len(ds)))):
        assert ex["crop"] == r.crop_jpeg and ex["image"] == r.image_jpeg  # the JPEG bytes pass through unchanged
        assert ex["caption"].decode() == r.caption and ex["annotation_id"].decode() == r.annotation_id
        np.testing.assert_array_equal(ex["box"], np.float32(r.box))
        assert np.isnan(ex["clip_score"]) and ex["source_index"] == r.source_index
    decoded = tfds.data_source("idmr_synth", split="train", data_dir=data_dir)[0]["crop"]
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(want[0].crop_jpeg))))
