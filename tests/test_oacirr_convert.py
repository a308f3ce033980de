"""OACIRR -> ArrayRecord converter: exact bad-input reporting, round trip, strict mode, resume, parallel == serial.

A small dataset in the released layout is built on the fly from scikit-image's bundled photographs, with one
entry for each kind of bad input the converter must catch.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import skimage.data
from PIL import Image

from data_prep import oacirr as oacirr_cli
from idmr_jax.data.shards import file_sha256
from idmr_jax.tasks.oacir import release
from idmr_jax.tasks.oacir import records

VARIANT, SPLIT = "Fashion", "val"
IMG_DIR, ANNO_DIR = release.VARIANTS[VARIANT]
F_CAPS = f"{ANNO_DIR}/quadruple_captions/caption_full.{SPLIT}.json"
F_SPLIT = f"{ANNO_DIR}/image_splits/split.{SPLIT}.json"
F_BOXES = f"{ANNO_DIR}/image_bounding_box/bounding_box.{SPLIT}.json"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
NUM_INSTANCES, PER_INSTANCE = 4, 3


def _write_image(path: str, photo: np.ndarray, k: int, fmt: str) -> tuple[int, int]:
    """A small real-looking image: a crop of a photograph, resized; returns its (w, h)."""
    h, w = photo.shape[:2]
    y, x = (17 * k) % (h // 3), (29 * k) % (w // 3)
    size = (48 + 8 * (k % 3), 40 + 6 * (k % 4))
    Image.fromarray(photo[y : y + 2 * h // 3, x : x + 2 * w // 3]).resize(size).save(path, format=fmt)
    return size


def _dump_pairs(path: str, pairs: list[tuple[str, object]]) -> None:
    """Writes a JSON object from key/value pairs, so a key can appear twice (as in a hand-edited file)."""
    with open(path, "w") as f:
        f.write("{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}")


def build_layout(root: str) -> dict:
    """Writes the dataset; returns the facts the tests check against."""
    img_root = os.path.join(root, IMG_DIR)
    for sub in ("quadruple_captions", "image_splits", "image_bounding_box"):
        os.makedirs(os.path.join(root, ANNO_DIR, sub), exist_ok=True)
    split_pairs, boxes, sizes, instance_of = [], {}, {}, {}
    for i in range(NUM_INSTANCES):
        photo = getattr(skimage.data, PHOTOS[i])()
        os.makedirs(os.path.join(img_root, "images", f"inst_{i:02d}"), exist_ok=True)
        for j in range(PER_INSTANCE):
            name, fmt = f"img_{i:02d}_{j}", ("PNG" if j == 2 else "JPEG")
            rel = f"images/inst_{i:02d}/{name}.{fmt.lower()}"
            sizes[name] = _write_image(os.path.join(img_root, rel), photo, 3 * i + j, fmt)
            split_pairs.append((name, rel))
            boxes[name] = [2, 3, sizes[name][0] - 5, sizes[name][1] - 4]
            instance_of[name] = f"inst_{i:02d}"
    # Bad gallery entries.
    split_pairs.append(("missing_img", "images/inst_00/missing.jpg"))
    truncated = os.path.join(img_root, "images/inst_01/truncated.jpg")
    with open(os.path.join(img_root, "images/inst_01/img_01_0.jpeg"), "rb") as f:
        good = f.read()
    with open(truncated, "wb") as f:
        f.write(good[: len(good) // 2])
    split_pairs.append(("truncated_img", "images/inst_01/truncated.jpg"))
    outside = os.path.join(root, "OACIRR-Subset", "outside", "escape.jpg")
    os.makedirs(os.path.dirname(outside))
    shutil.copy(truncated.replace("truncated.jpg", "img_01_0.jpeg"), outside)  # exists, but must not be read
    split_pairs.append(("escape_img", "../outside/escape.jpg"))
    split_pairs.append(("abs_img", outside))
    split_pairs.insert(4, ("img_00_0", "images/inst_01/img_01_1.jpeg"))  # a repeated name (position 4)
    _dump_pairs(os.path.join(root, F_SPLIT), split_pairs)
    _dump_pairs(os.path.join(root, F_BOXES), [(n, b) for n, b in boxes.items()] + [("missing_img", [1, 1, 5, 5])])

    def quad(ref, tgt, box, text="make it sunny", **extra):
        return {"reference": ref, "target": tgt, "modification_text_mllm": text, "reference_bounding_box": box,
                "object_category": "jacket", **extra}

    caps = []
    for i in range(NUM_INSTANCES):
        for j in range(PER_INSTANCE - 1):
            ref, tgt = f"img_{i:02d}_{j}", f"img_{i:02d}_{j + 1}"
            caps.append(quad(ref, tgt, [1.5, 2, 20, 30.25], text=f"put it on a beach {i}{j}",
                             target_subset_vitG=[tgt, f"img_{(i + 1) % NUM_INSTANCES:02d}_0"]))
    w, h = sizes["img_03_1"]
    caps.append(quad("img_03_1", "img_03_0", [0, 0, w + 0.5, h]))  # within tolerance: clipped, kept
    caps.append(quad("img_02_1", "img_02_2", None))  # no box: kept without one
    bad = {  # index -> (reference name, field, code)
        len(caps): ("missing_img", "reference", "unusable_image"),
        len(caps) + 1: ("img_00_0", "target", "unusable_image"),
        len(caps) + 2: ("img_00_1", "reference_bounding_box", "box_outside"),
        len(caps) + 3: ("img_00_1", "reference_bounding_box", "box_empty"),
        len(caps) + 4: ("img_00_1", "reference_bounding_box", "box_nonfinite"),
        len(caps) + 5: ("img_00_1", "modification_text_mllm", "empty_text"),
        len(caps) + 6: ("ghost_img", "reference", "unknown_name"),
    }
    caps += [quad("missing_img", "img_00_1", [1, 1, 9, 9]), quad("img_00_0", "truncated_img", [1, 1, 9, 9]),
             quad("img_00_1", "img_00_2", [0, 0, 500, 20]), quad("img_00_1", "img_00_2", [10, 10, 10, 30]),
             quad("img_00_1", "img_00_2", [float("nan"), 1, 5, 5]), quad("img_00_1", "img_00_2", [1, 1, 9, 9], "  "),
             quad("ghost_img", "img_00_2", [1, 1, 9, 9])]
    with open(os.path.join(root, F_CAPS), "w") as f:
        json.dump(caps, f)  # writes NaN as the bare NaN token, as Python-made annotation files do
    expected_skips = {(F_CAPS, idx, name, field, code) for idx, (name, field, code) in bad.items()} | {
        (F_SPLIT, len(split_pairs) - 4, "missing_img", "image", "missing_image"),
        (F_SPLIT, len(split_pairs) - 3, "truncated_img", "image", "undecodable_image"),
        (F_SPLIT, len(split_pairs) - 2, "escape_img", "path", "unsafe_path"),
        (F_SPLIT, len(split_pairs) - 1, "abs_img", "path", "unsafe_path"),
        (F_SPLIT, 4, "img_00_0", "name", "duplicate_name"),
    }
    return {"root": root, "captions": caps, "bad_indices": set(bad), "boxes": boxes, "sizes": sizes,
            "instance_of": instance_of, "paths": dict(split_pairs[:4] + split_pairs[5:]),
            "expected_skips": expected_skips}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_layout(str(tmp_path_factory.mktemp("oacirr")))


@pytest.fixture(scope="module")
def serial(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("serial"))
    result = release.convert(dataset["root"], VARIANT, SPLIT, out, num_shards=4, gallery_shards=2, workers=1)
    return out, result


def _shards(out: str) -> dict[str, bytes]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".array_record") or n == release.MANIFEST)
    return {n: open(os.path.join(out, n), "rb").read() for n in names}


def test_reports_exactly_the_broken_records(dataset, serial):
    _, result = serial
    got = {(s["file"], s["index"], s["name"], s["field"], s["code"]) for s in result.manifest["skipped"]}
    assert got == dataset["expected_skips"]
    assert all(s["reason"] and s["action"] == "record_skipped" for s in result.manifest["skipped"])
    counts = result.manifest["counts"]
    assert counts["queries"] == len(dataset["captions"]) - len(dataset["bad_indices"])
    assert counts["gallery"] == NUM_INSTANCES * PER_INSTANCE
    assert counts["instances"]["gallery"] == NUM_INSTANCES
    assert counts["boxes_clipped"] == {"queries": 1, "gallery": 0}
    assert counts["queries_without_box"] == 1 and counts["gallery_without_box"] == 0
    assert counts["skipped"] == {"record_skipped": len(dataset["expected_skips"]), "box_dropped": 0,
                                 "entry_ignored": 0}


def test_manifest_matches_shards(serial):
    out, result = serial
    m = json.load(open(os.path.join(out, release.MANIFEST)))
    assert m == result.manifest
    for kind, total in (("queries", m["counts"]["queries"]), ("gallery", m["counts"]["gallery"])):
        entries = m["shards"][kind]
        assert len(entries) == {"queries": 4, "gallery": 2}[kind]
        assert sum(e["records"] for e in entries) == total
        for e in entries:
            path = os.path.join(out, e["file"])
            assert file_sha256(path) == e["sha256"] and os.path.getsize(path) == e["bytes"]
            assert len(records.read_shards([path])) == e["records"]
    assert set(m["sources"]["files"]) == {F_CAPS, F_SPLIT, F_BOXES}
    assert "workers" not in m["args"] and m["tool"]["version"] == release.TOOL_VERSION


def test_records_round_trip(dataset, serial):
    out, _ = serial
    root = dataset["root"]
    img = lambda name: open(os.path.join(root, IMG_DIR, dataset["paths"][name]), "rb").read()
    gallery = records.read_shards(os.path.join(out, "gallery-*.array_record"))
    assert [g.name for g in gallery] == sorted(dataset["boxes"])
    for g in gallery:
        assert g.image == img(g.name)
        assert g.instance == dataset["instance_of"][g.name] and g.subset == "fashion" and g.variant == VARIANT
        assert g.box == tuple(map(float, dataset["boxes"][g.name])) and g.image_size == dataset["sizes"][g.name]
        assert Image.open(io.BytesIO(g.image)).size == g.image_size
    queries = records.read_shards(os.path.join(out, "queries-*.array_record"))
    kept = [i for i in range(len(dataset["captions"])) if i not in dataset["bad_indices"]]
    assert [q.source_index for q in queries] == kept
    for q in queries:
        src = dataset["captions"][q.source_index]
        assert q.reference_image == img(src["reference"]) and q.reference_name == src["reference"]
        assert q.reference_instance == dataset["instance_of"][src["reference"]]
        assert q.target_name == src["target"] and q.target_instance == dataset["instance_of"][src["target"]]
        assert q.modification_text == src["modification_text_mllm"] and q.object_category == "jacket"
        assert gallery[q.reference_gallery_index].name == q.reference_name
        assert gallery[q.target_gallery_index].name == q.target_name
        assert q.target_subset_vitG == (tuple(src["target_subset_vitG"]) if "target_subset_vitG" in src else None)
        w, h = q.reference_size
        box = src["reference_bounding_box"]
        assert q.reference_box == (None if box is None else (box[0], box[1], min(box[2], w), min(box[3], h)))


def test_strict_names_file_record_and_field(dataset, tmp_path, capsys):
    out = str(tmp_path / "strict")
    with pytest.raises(release.ConversionError) as err:
        release.convert(dataset["root"], VARIANT, SPLIT, out, strict=True)
    msg = str(err.value)
    nan_idx = next(s[1] for s in dataset["expected_skips"] if s[4] == "box_nonfinite")
    assert f"{F_CAPS}: record {nan_idx} ('img_00_1'), field 'reference_bounding_box': box has non-finite" in msg
    assert f"{F_SPLIT}: record" in msg and "('escape_img'), field 'path'" in msg
    assert msg.count("\n") == len(dataset["expected_skips"])  # one line per bad entry
    assert not [n for n in os.listdir(out) if n.endswith(".array_record")]  # nothing written
    # The CLI reports the same and exits non-zero.
    argv = ["--root", dataset["root"], "--variant", VARIANT, "--split", SPLIT, "--out", out, "--strict"]
    assert oacirr_cli.main(argv) == 2
    assert "field 'modification_text_mllm': empty text" in capsys.readouterr().err


def test_resume_rewrites_only_missing_or_altered_shards(dataset, serial, tmp_path):
    out = str(tmp_path / "resume")
    kw = dict(num_shards=4, gallery_shards=2)
    first = release.convert(dataset["root"], VARIANT, SPLIT, out, **kw)
    before = _shards(out)
    assert before == _shards(serial[0])  # idempotent across output folders
    stamps = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in before}

    again = release.convert(dataset["root"], VARIANT, SPLIT, out, **kw)
    assert again.written == [] and len(again.reused) == 6 and _shards(out) == before

    victim, tampered = "queries-00001-of-00004.array_record", "gallery-00000-of-00002.array_record"
    os.remove(os.path.join(out, victim))
    with open(os.path.join(out, tampered), "ab") as f:
        f.write(b"x")
    resumed = release.convert(dataset["root"], VARIANT, SPLIT, out, **kw)
    assert sorted(resumed.written) == sorted([victim, tampered])
    assert _shards(out) == before and resumed.manifest == first.manifest
    for n, t in stamps.items():
        if n not in (victim, tampered, release.MANIFEST):
            assert os.stat(os.path.join(out, n)).st_mtime_ns == t, n
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_parallel_equals_serial(dataset, serial, tmp_path):
    out = str(tmp_path / "parallel")
    result = release.convert(dataset["root"], VARIANT, SPLIT, out, num_shards=4, gallery_shards=2, workers=2)
    assert len(result.written) == 6
    assert _shards(out) == _shards(serial[0])


def test_max_side_reencodes_and_rescales_boxes(dataset, tmp_path):
    out = str(tmp_path / "small")
    release.convert(dataset["root"], VARIANT, SPLIT, out, max_side=32)
    for g in records.read_shards(os.path.join(out, "gallery-*.array_record")):
        assert max(g.image_size) == 32 and g.orig_size == dataset["sizes"][g.name]
        with Image.open(io.BytesIO(g.image)) as im:
            assert im.size == g.image_size and im.format == ("PNG" if g.name.endswith("_2") else "JPEG")
        sx, sy = g.image_size[0] / g.orig_size[0], g.image_size[1] / g.orig_size[1]
        x1, y1, x2, y2 = dataset["boxes"][g.name]
        np.testing.assert_allclose(g.box, (x1 * sx, y1 * sy, x2 * sx, y2 * sy))


def test_union_subsets_are_read_off_the_path(tmp_path):
    root = str(tmp_path)
    img_dir, anno_dir = release.VARIANTS["Union"]
    paths = {"a": "train/fashion/i1/a.png", "b": "train/OACIRR-Car/i2/b.png", "c": "misc/i3/c.png"}
    for rel in paths.values():
        os.makedirs(os.path.join(root, img_dir, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(os.path.join(root, img_dir, rel))
    boxes = {"a": [2, 2, 2, 5], "zzz": [1, 1, 2, 2], "b": [1, 1, 9, 7]}  # a: zero area; zzz: not in split map
    for sub, name, obj in (("image_splits", "split", paths), ("image_bounding_box", "bounding_box", boxes),
                           ("quadruple_captions", "caption_full",
                            [{"reference": "b", "target": "a", "modification_text_mllm": "t",
                              "reference_bounding_box": [0, 0, 4, 4], "object_category": "car"}])):
        os.makedirs(os.path.join(root, anno_dir, sub))
        json.dump(obj, open(os.path.join(root, anno_dir, sub, f"{name}.train.json"), "w"))
    out = str(tmp_path / "out")
    m = release.convert(root, "Union", "train", out).manifest
    gallery = records.read_shards(os.path.join(out, "gallery-*"))
    assert {g.name: (g.subset, g.instance, g.box) for g in gallery} == {
        "a": ("fashion", "i1", None), "b": ("car", "i2", (1.0, 1.0, 9.0, 7.0)), "c": ("union", "i3", None)}
    f_boxes = f"{anno_dir}/image_bounding_box/bounding_box.train.json"
    assert [(s["file"], s["index"], s["name"], s["field"], s["code"], s["action"]) for s in m["skipped"]] == [
        (f_boxes, 0, "a", "box", "box_empty", "box_dropped"), (f_boxes, 1, "zzz", "name", "unknown_name", "entry_ignored")]
    (q,) = records.read_shards(os.path.join(out, "queries-*"))
    assert (q.subset, q.reference_instance, q.target_instance) == ("car", "i2", "i1")
    assert m["counts"]["per_subset"] == {"car": {"gallery": 1, "queries": 1}, "fashion": {"gallery": 1, "queries": 0},
                                         "union": {"gallery": 1, "queries": 0}}


def _query(**overrides) -> records.QueryRecord:
    fields = dict(reference_image=b"\xff\xd8img", reference_name="r", reference_instance="i",
                  reference_box=(1.0, 2.0, 5.0, 6.0), reference_size=(10, 8), reference_orig_size=(20, 16),
                  object_category="car", modification_text="t",
                  target_name="t", target_instance="i", subset="car", variant="Car", source_index=3,
                  reference_gallery_index=0, target_gallery_index=1, target_subset_vitG=("a", "b"))
    return records.QueryRecord(**{**fields, **overrides})


def test_record_schema_round_trip_and_errors():
    q = _query()
    assert records.decode_query(records.encode_query(q)) == q
    assert records.decode_any(records.encode_query(q)) == q
    g = records.GalleryRecord(image=b"\x89PNG", name="n", instance="i", box=None, image_size=(3, 4),
                              orig_size=(3, 4), subset="union", variant="Union")
    assert records.decode_gallery(records.encode_gallery(g)) == g
    with pytest.raises(records.RecordError, match="field 'reference_box'.*outside"):
        records.encode_query(_query(reference_box=(0.0, 0.0, 11.0, 8.0)))
    with pytest.raises(records.RecordError, match="field 'modification_text': empty"):
        records.encode_query(_query(modification_text=" "))
    import msgpack

    raw = msgpack.unpackb(records.encode_query(q))
    for change, field in ((dict(version=2), "version"), (dict(kind="gallery"), "kind"),
                          (dict(reference_size=[10]), "reference_size"), (dict(extra=1), "extra"),
                          (dict(reference_box=[1, 2, float("nan"), 4]), "reference_box")):
        with pytest.raises(records.RecordError) as err:
            records.decode_query(msgpack.packb({**raw, **change}, use_bin_type=True))
        assert err.value.field == field and f"field '{field}'" in str(err.value)
    del raw["target_name"]
    with pytest.raises(records.RecordError, match="field 'target_name': missing"):
        records.decode_query(msgpack.packb(raw, use_bin_type=True))
    with pytest.raises(records.RecordError, match="not a msgpack record"):
        records.decode_gallery(b"\xc1")
